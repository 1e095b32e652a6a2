"""ConvNeXt-Tiny (Liu et al. 2022), torchvision layout."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import drop_path, maybe_remat, torch_padding
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool


def layer_norm(dtype) -> Any:
    """LayerNorm over channels (torchvision's ``LayerNorm2d`` on NHWC is a plain LayerNorm), with
    torchvision's epsilon 1e-6. The variance is torch's two-pass ``mean((x - mean)^2)``: Flax's
    default one-pass ``mean(x^2) - mean^2`` loses float32 digits to cancellation wherever a
    position's channel mean is large next to their spread, which an epsilon this small does not
    mask."""
    return partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False, dtype=dtype)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Dense(4C) -> GELU -> Dense(C) -> layer scale ->
    stochastic depth, plus the identity."""

    drop_path: float = 0.0
    layer_scale: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> (N, H, W, C)."""
        c = x.shape[-1]
        pad = torch_padding(7)
        y = ConvBN(c, (7, 7), padding=pad, groups=c, act=None, dtype=self.dtype, name="dwconv")(x)
        y = layer_norm(self.dtype)(name="ln")(y)
        y = nn.gelu(nn.Dense(4 * c, dtype=self.dtype, name="fc1")(y), approximate=False)
        y = nn.Dense(c, dtype=self.dtype, name="fc2")(y)
        gamma = self.param("layer_scale", nn.initializers.constant(self.layer_scale), (c,))
        y = y * gamma.astype(self.dtype)
        return x + drop_path(self.drop_path, name="drop_path")(y, deterministic=not train)


class ConvNeXt(nn.Module):
    """torchvision ConvNeXt: 4x4/4 patchify stem + LayerNorm, four stages of ConvNeXt blocks
    joined by LayerNorm + 2x2/2 conv downsampling, global average pool, LayerNorm and a dense
    head. Stochastic depth grows linearly to ``stochastic_depth`` at the last block.
    ConvNeXt-T has 28,589,128 parameters at 1000 classes.

    ``small_input=True`` (28-32 px images) swaps the patchify stem for a 3x3/1 conv.

    Attributes:
      depths: blocks per stage.
      dims: channels per stage.
      stochastic_depth: drop-path rate of the last block.
      layer_scale: initial value of the per-channel residual scale.
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each block.
    """

    num_classes: int = 1000
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    stochastic_depth: float = 0.1
    layer_scale: float = 1e-6
    small_input: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = layer_norm(self.dtype)
        x = x.astype(self.dtype)
        k, s = ((3, 3), (1, 1)) if self.small_input else ((4, 4), (4, 4))
        pad = 1 if self.small_input else 0
        x = ConvBN(self.dims[0], k, s, pad, act=None, dtype=self.dtype, name="stem")(x)
        x = norm(name="stem_ln")(x)
        total, index = sum(self.depths), 0
        convnext_block = maybe_remat(ConvNeXtBlock, self.remat, static_argnums=(2,))  # (x, train)
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True), start=1):
            if i > 1:
                x = norm(name=f"downsample{i}_ln")(x)
                down = partial(ConvBN, dim, (2, 2), (2, 2), 0, act=None, dtype=self.dtype)
                x = down(name=f"downsample{i}")(x)
            for j in range(1, depth + 1):
                rate = self.stochastic_depth * index / max(total - 1, 1)
                name = f"stage{i}_block{j}"
                x = convnext_block(rate, self.layer_scale, self.dtype, name=name)(x, train)
                index += 1
        x = GlobalAvgPool(name="pool")(x)
        x = norm(name="head_ln")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


@register
def convnext_tiny(num_classes: int = 1000, **kwargs) -> nn.Module:
    """ConvNeXt-T (torchvision layout: LayerNorm, layer scale 1e-6, stochastic depth 0.1)."""
    return ConvNeXt(num_classes=num_classes, **kwargs)
