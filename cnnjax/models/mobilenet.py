"""MobileNetV2 (Sandler et al. 2018), torchvision layout."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import make_divisible, maybe_remat, torch_padding
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool, batch_norm

# (expansion t, channels c, repeats n, first stride s) per stage, as in the paper's Table 2.
INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def relu6(x):
    return jnp.clip(x, 0, 6)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expansion == 1``) -> 3x3 depthwise -> 1x1 linear projection;
    identity residual when the shape is kept."""

    features: int
    strides: int = 1
    expansion: int = 6
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features)."""
        conv = partial(ConvBN, norm=self.norm, act=relu6, dtype=self.dtype)
        hidden = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = conv(hidden, (1, 1), name="expand")(y)
        s, pad = (self.strides,) * 2, torch_padding(3, self.strides)
        y = conv(hidden, (3, 3), s, pad, groups=hidden, name="depthwise")(y)
        y = conv(self.features, (1, 1), act=None, name="project")(y)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2: 3x3/2 stem, 17 inverted residuals, 1x1 conv to 1280, global
    average pool, dropout and a dense head. 3,504,872 parameters at 1000 classes.

    ``small_input=True`` (28-32 px images) makes the stem stride 1.

    Attributes:
      width_mult: channel multiplier (rounded to multiples of 8).
      settings: the stage table (``INVERTED_RESIDUALS``).
      dropout: rate before the classifier.
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each inverted residual.
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    settings: Sequence[Sequence[int]] = INVERTED_RESIDUALS
    dropout: float = 0.2
    small_input: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype)
        conv = partial(ConvBN, norm=norm, act=relu6, dtype=self.dtype)
        stem_strides = (1, 1) if self.small_input else (2, 2)
        stem = make_divisible(32 * self.width_mult)
        x = x.astype(self.dtype)
        x = conv(stem, (3, 3), stem_strides, torch_padding(3, stem_strides[0]), name="stem")(x)
        inverted_residual = maybe_remat(InvertedResidual, self.remat)
        for i, (t, c, n, s) in enumerate(self.settings, start=1):
            features = make_divisible(c * self.width_mult)
            for j in range(n):
                strides = s if j == 0 else 1
                block = inverted_residual(
                    features, strides, t, norm, self.dtype, name=f"stage{i}_block{j + 1}"
                )
                x = block(x)
        last = make_divisible(1280 * max(1.0, self.width_mult))
        x = conv(last, (1, 1), name="last_conv")(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, self.dropout, self.dtype, name="head")(x, train)


@register
def mobilenet_v2(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNetV2 (torchvision layout, width 1.0)."""
    return MobileNetV2(num_classes=num_classes, **kwargs)
