"""Small tutorial CNNs (Keras CIFAR tutorial, PyTorch tutorial, the worked example)."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.nn.layers import ConvBN, DenseHead, MaxPool, batch_norm


class KerasCifarCNN(nn.Module):
    """Conv32-pool-Conv64-pool-Conv128-Flatten-Dense128-Dense, 3x3 VALID convs with ReLU and
    2x2 max-pools (Keras CIFAR-10 tutorial style). 356,810 parameters at 32x32x3 and 10 classes.
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    hidden: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        x = x.astype(self.dtype)
        for i, features in enumerate(self.widths, start=1):
            x = ConvBN(features, padding="VALID", dtype=self.dtype, name=f"conv{i}")(x)
            if i < len(self.widths):
                x = MaxPool(2, name=f"pool{i}")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


class TorchSmallCNN(nn.Module):
    """The PyTorch tutorial SmallCNN: two blocks of Conv3x3 (padding 1) -> BN -> ReLU -> 2x2
    max-pool (32, 64 channels), flatten, dropout, dense. The convs are bias-free (BatchNorm's
    shift makes a bias redundant). 50,282 parameters at 28x28x1 and 10 classes (BN scale and
    shift included; running statistics are in ``batch_stats``).
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    dropout: float = 0.25
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype)
        x = x.astype(self.dtype)
        for i, features in enumerate(self.widths, start=1):
            x = ConvBN(features, padding=1, norm=norm, dtype=self.dtype, name=f"block{i}")(x)
            x = MaxPool(2, name=f"pool{i}")(x)
        x = x.reshape(x.shape[0], -1)
        return DenseHead(self.num_classes, self.dropout, self.dtype, name="head")(x, train)


class ExampleCNN(nn.Module):
    """The worked example: Conv16-pool-Conv32-pool-Dense, 3x3 SAME convs with ReLU and 2x2
    max-pools. 20,490 parameters at 28x28x1 and 10 classes."""

    num_classes: int = 10
    widths: Sequence[int] = (16, 32)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        x = x.astype(self.dtype)
        for i, features in enumerate(self.widths, start=1):
            x = ConvBN(features, dtype=self.dtype, name=f"conv{i}")(x)
            x = MaxPool(2, name=f"pool{i}")(x)
        x = x.reshape(x.shape[0], -1)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


# Linen module classes are factories themselves: Class(num_classes=..., **attributes).
register(KerasCifarCNN, name="keras_cifar_cnn")
register(TorchSmallCNN, name="torch_small_cnn")
register(ExampleCNN, name="example_cnn")
