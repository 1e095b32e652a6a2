"""VGG-11/13/16/19 with and without BatchNorm (Simonyan & Zisserman 2015), torchvision layout."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.nn.layers import AdaptiveAvgPool, ConvBN, DenseHead, MaxPool, batch_norm

# Conv widths per stage (each stage ends in a 2x2 max-pool): torchvision's configs A, B, D, E.
STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    """torchvision VGG: 3x3 biased convs with ReLU (BatchNorm after the biased conv when
    ``batch_norm``, as torchvision does), 2x2 max-pools, an adaptive average pool to 7x7 and a
    4096-4096 classifier with dropout after each hidden layer. Flattening is (H, W, C) order,
    NHWC's own: ``models.pretrained`` permutes fc1's input rows from torch's (C, H, W) when it
    loads torchvision weights.

    ``small_input=True`` (28-32 px images) pools with SAME padding (ceil, so 28 px survives five
    halvings: 28-14-7-4-2-1), pools to 1x1 and narrows the classifier to 512 units, the usual
    CIFAR VGG.

    Attributes:
      stages: conv widths per stage (``STAGES[depth]``).
      batch_norm: BatchNorm after every conv.
      pool_size: side of the adaptive average pool (None: 7, or 1 with ``small_input``).
      classifier_width: hidden units of the classifier (None: 4096, or 512 with ``small_input``).
      dropout: rate after each hidden dense layer.
    """

    stages: Sequence[Sequence[int]]
    num_classes: int = 1000
    batch_norm: bool = False
    pool_size: int | None = None
    classifier_width: int | None = None
    dropout: float = 0.5
    small_input: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype) if self.batch_norm else None
        x = x.astype(self.dtype)
        pool_padding = "SAME" if self.small_input else "VALID"
        for i, widths in enumerate(self.stages, start=1):
            for j, features in enumerate(widths, start=1):
                name = f"conv{i}_{j}"
                # torchvision keeps the conv bias even before BatchNorm, so ConvBN gets no norm.
                x = ConvBN(features, padding=1, act=None, dtype=self.dtype, name=name)(x)
                x = nn.relu(x if norm is None else norm(name=f"{name}_bn")(x))
            x = MaxPool(2, padding=pool_padding, name=f"pool{i}")(x)
        x = AdaptiveAvgPool(self.pool_size or (1 if self.small_input else 7), name="avgpool")(x)
        x = x.reshape(x.shape[0], -1)
        width = self.classifier_width or (512 if self.small_input else 4096)
        for i in (1, 2):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i}")(x))
            if i == 1:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return DenseHead(self.num_classes, self.dropout, self.dtype, name="head")(x, train)


def _vgg(depth: int, bn: bool):
    def factory(num_classes: int = 1000, **kwargs) -> nn.Module:
        kwargs = {"stages": STAGES[depth], "batch_norm": bn, **kwargs}
        return VGG(num_classes=num_classes, **kwargs)

    factory.__doc__ = f"VGG-{depth}{' with BatchNorm' if bn else ''} (torchvision layout)."
    return factory


for _depth in STAGES:
    register(_vgg(_depth, False), name=f"vgg{_depth}")
    register(_vgg(_depth, True), name=f"vgg{_depth}_bn")
