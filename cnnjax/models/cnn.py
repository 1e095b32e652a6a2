"""The tutorials' plain CNNs and a fast small-image net."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool, MaxPool, batch_norm


class SimpleCNN(nn.Module):
    """The Keras tutorial CNN: Conv32-pool-Conv64-pool-Flatten-Dense128-Dense (3x3, SAME)."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        x = x.astype(self.dtype)
        for i, features in enumerate((32, 64), start=1):
            x = ConvBN(features, dtype=self.dtype, name=f"conv{i}")(x)
            x = MaxPool(2, name=f"pool{i}")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, dtype=self.dtype, name="fc1")(x))
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


class CifarCNN(nn.Module):
    """The tutorials' CIFAR CNN: 3 x [2 x (Conv+BN+ReLU), max-pool, dropout 0.25], then
    Dense 256 + BN + ReLU, dropout 0.5, Dense."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype)
        x = x.astype(self.dtype)
        for i, features in enumerate(self.widths, start=1):
            conv = partial(ConvBN, features, norm=norm, dtype=self.dtype)
            x = conv(name=f"block{i}_conv1")(x)
            x = conv(name=f"block{i}_conv2")(x)
            x = MaxPool(2, name=f"block{i}_pool")(x)
            x = nn.Dropout(0.25, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(256, use_bias=False, dtype=self.dtype, name="fc1")(x)
        x = nn.relu(norm(name="fc1_bn")(x))
        return DenseHead(self.num_classes, 0.5, self.dtype, name="head")(x, train)


class FastCNN(nn.Module):
    """A small-image net built for speed runs on any hardware (after airbench): a full-resolution
    stem, then groups of max-pool -> [conv -> BN -> ReLU] x ``depth``, bias-free convs, global
    average pooling and a linear head. Pooling *before* each wide conv keeps the costly convs at
    low resolution, which is what makes it fast on a CPU.
    """

    num_classes: int = 10
    stem_width: int = 24
    widths: Sequence[int] = (48, 96)
    depth: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        conv = partial(ConvBN, norm=batch_norm(train, self.dtype), dtype=self.dtype)
        x = conv(self.stem_width, name="stem")(x.astype(self.dtype))
        for i, features in enumerate(self.widths, start=1):
            x = MaxPool(2, name=f"group{i}_pool")(x)
            for j in range(1, self.depth + 1):
                x = conv(features, name=f"group{i}_conv{j}")(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


# Linen module classes are factories themselves: Class(num_classes=..., **attributes).
register(SimpleCNN, name="simple_cnn")
register(CifarCNN, name="cifar_cnn")
register(FastCNN, name="fast_cnn")
