"""ResNets: ImageNet-style (torchvision layer for layer) and the CIFAR family of He et al. 2016."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import maybe_remat, torch_padding
from cnnjax.nn.layers import (
    BottleneckBlock,
    ConvBN,
    DenseHead,
    GlobalAvgPool,
    MaxPool,
    ResidualBlock,
    batch_norm,
)


class ResNet(nn.Module):
    """ResNet v1.5 for ImageNet-size inputs; ``small_input=True`` swaps the 7x7/2 stem and its
    max-pool for a 3x3/1 stem so 28-32 px images keep their resolution. Every conv and pool
    pads symmetrically as torch does, so torchvision's weights give torchvision's outputs
    (``cnnjax.models.pretrained``).

    Attributes:
      stage_sizes: blocks per stage.
      block: ``ResidualBlock`` or ``BottleneckBlock``.
      width: channels of the first stage (doubles each stage).
      block_kwargs: extra block attributes (e.g. ``{"width": 128}`` scaling for Wide ResNets is
        handled by ``width_factor``).
      width_factor: bottleneck width multiplier (2 for Wide ResNet-50-2).
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each block.
    """

    stage_sizes: Sequence[int]
    block: Any
    num_classes: int = 1000
    width: int = 64
    width_factor: int = 1
    small_input: bool = False
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype)
        x = x.astype(self.dtype)
        if self.small_input:
            x = ConvBN(self.width, (3, 3), norm=norm, dtype=self.dtype, name="stem")(x)
        else:
            # Torch's symmetric padding (Flax's "SAME" pads stride 2 bottom/right only).
            stem = partial(ConvBN, self.width, (7, 7), (2, 2), torch_padding(7, 2), name="stem")
            x = stem(norm=norm, dtype=self.dtype)(x)
            x = MaxPool(3, 2, torch_padding(3, 2), name="stem_pool")(x)
        block = partial(
            maybe_remat(self.block, self.remat),
            norm=norm,
            zero_init_residual=self.zero_init_residual,
            dtype=self.dtype,
        )
        if self.block is BottleneckBlock:
            block = partial(block, width=None)
        for i, n in enumerate(self.stage_sizes):
            features = self.width * 2**i
            extra = {"width": features * self.width_factor} if self.width_factor != 1 else {}
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(features, strides, name=f"stage{i + 1}_block{j + 1}", **extra)(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016: 3x3/16 stem, three stages of n basic blocks with
    16/32/64 channels, parameter-free option-A shortcuts, global average pool, dense head.
    ``remat``: ``config.remat``; ``blocks[:POLICY]`` rematerialises each block."""

    depth: int
    num_classes: int = 10
    width: int = 16
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        n = (self.depth - 2) // 6
        norm = batch_norm(train, self.dtype)
        x = ConvBN(self.width, norm=norm, dtype=self.dtype, name="stem")(x.astype(self.dtype))
        block = maybe_remat(ResidualBlock, self.remat)
        for i in range(3):
            for j in range(n):
                x = block(
                    self.width * 2**i,
                    2 if i > 0 and j == 0 else 1,
                    norm=norm,
                    zero_init_residual=self.zero_init_residual,
                    shortcut="pad",
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


def _imagenet_resnet(stage_sizes, block, doc, **defaults):
    def factory(num_classes: int = 1000, **kwargs) -> nn.Module:
        return ResNet(stage_sizes, block, num_classes=num_classes, **{**defaults, **kwargs})

    factory.__doc__ = doc
    return factory


_BASIC, _BOTTLENECK = ResidualBlock, BottleneckBlock
for _name, _stages, _block in [
    ("resnet18", (2, 2, 2, 2), _BASIC),
    ("resnet34", (3, 4, 6, 3), _BASIC),
    ("resnet50", (3, 4, 6, 3), _BOTTLENECK),
    ("resnet101", (3, 4, 23, 3), _BOTTLENECK),
    ("resnet152", (3, 8, 36, 3), _BOTTLENECK),
]:
    register(_imagenet_resnet(_stages, _block, f"{_name} (torchvision layout)."), name=_name)
register(
    _imagenet_resnet((3, 4, 6, 3), _BOTTLENECK, "Wide ResNet-50-2.", width_factor=2),
    name="wide_resnet50_2",
)

for _depth in (20, 32, 44, 56, 110):
    register(
        partial(CifarResNet, _depth),
        name=f"resnet{_depth}",
    )
