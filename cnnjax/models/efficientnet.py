"""EfficientNet-B0 (Tan & Le 2019), torchvision layout."""

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import drop_path, make_divisible, maybe_remat, torch_padding
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool, batch_norm

# (expansion, kernel, first stride, out channels, repeats) per stage, B0 before scaling.
MBCONV_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 conv (SiLU) -> 1x1 conv (sigmoid) -> rescale."""

    squeeze: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H, W, C)."""
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = ConvBN(self.squeeze, (1, 1), act=nn.silu, dtype=self.dtype, name="reduce")(s)
        s = ConvBN(x.shape[-1], (1, 1), act=nn.sigmoid, dtype=self.dtype, name="expand")(s)
        return x * s


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation: 1x1 expand (SiLU, skipped at
    expansion 1) -> kxk depthwise (SiLU) -> SE (squeeze = input channels / 4) -> 1x1 linear
    projection; identity residual with stochastic depth when the shape is kept."""

    features: int
    kernel: int = 3
    strides: int = 1
    expansion: int = 6
    drop_path: float = 0.0
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features)."""
        conv = partial(ConvBN, norm=self.norm, act=nn.silu, dtype=self.dtype)
        cin = x.shape[-1]
        hidden = make_divisible(cin * self.expansion)
        y = x
        if hidden != cin:
            y = conv(hidden, (1, 1), name="expand")(y)
        k, s = (self.kernel,) * 2, (self.strides,) * 2
        pad = torch_padding(self.kernel, self.strides)
        y = conv(hidden, k, s, pad, groups=hidden, name="depthwise")(y)
        y = SqueezeExcite(max(1, cin // 4), self.dtype, name="se")(y)
        y = conv(self.features, (1, 1), act=None, name="project")(y)
        if self.strides == 1 and cin == self.features:
            y = drop_path(self.drop_path, name="drop_path")(y, deterministic=not train)
            y = y + x
        return y


class EfficientNet(nn.Module):
    """torchvision EfficientNet: 3x3/2 stem (SiLU), MBConv stages, 1x1 conv to 4x the last
    width, global average pool, dropout and a dense head. Stochastic depth grows linearly with
    the block index, ``rate * i / num_blocks``, as in torchvision. B0 has 5,288,548 parameters
    at 1000 classes.

    ``small_input=True`` (28-32 px images) makes the stem stride 1.

    Attributes:
      width_mult: channel multiplier (rounded to multiples of 8).
      depth_mult: repeat multiplier (rounded up).
      stages: the stage table (``MBCONV_STAGES``).
      stochastic_depth: drop-path rate of the last block.
      dropout: rate before the classifier.
      bn_epsilon: BatchNorm epsilon; torchvision's B0-B4 use BatchNorm2d's default 1e-5 (only
        B5-B7 and the V2 family use 1e-3), and pretrained weights only reproduce with theirs.
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each MBConv block.
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    depth_mult: float = 1.0
    stages: Sequence[Sequence[int]] = MBCONV_STAGES
    stochastic_depth: float = 0.2
    dropout: float = 0.2
    small_input: bool = False
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype, epsilon=self.bn_epsilon)
        conv = partial(ConvBN, norm=norm, act=nn.silu, dtype=self.dtype)
        width = lambda c: make_divisible(c * self.width_mult)
        stem_strides = (1, 1) if self.small_input else (2, 2)
        pad = torch_padding(3, stem_strides[0])
        x = conv(width(32), (3, 3), stem_strides, pad, name="stem")(x.astype(self.dtype))
        repeats = [math.ceil(n * self.depth_mult) for *_, n in self.stages]
        index = 0
        mbconv = maybe_remat(MBConv, self.remat, static_argnums=(2,))  # (self, x, train)
        for i, ((t, k, s, c, _), n) in enumerate(zip(self.stages, repeats, strict=True), 1):
            for j in range(n):
                rate = self.stochastic_depth * index / sum(repeats)
                strides = s if j == 0 else 1
                name = f"stage{i}_block{j + 1}"
                x = mbconv(width(c), k, strides, t, rate, norm, self.dtype, name=name)(x, train)
                index += 1
        x = conv(4 * width(self.stages[-1][3]), (1, 1), name="last_conv")(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, self.dropout, self.dtype, name="head")(x, train)


@register
def efficientnet_b0(num_classes: int = 1000, **kwargs) -> nn.Module:
    """EfficientNet-B0 (torchvision layout: SE, SiLU, stochastic depth 0.2)."""
    return EfficientNet(num_classes=num_classes, **kwargs)
