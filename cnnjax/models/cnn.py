"""The tutorials' plain CNNs and a fast small-image net."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers import ConvBN, DenseHead, MaxPool, batch_norm
from cnnjax.models import register


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
    """A small-image net built for speed runs (after airbench): a few wide conv groups, each
    conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, bias-free convs, global max-pool and a
    bias-free linear head whose logits are scaled down (friendly to label smoothing).
    """

    num_classes: int = 10
    stem_width: int = 24
    widths: Sequence[int] = (64, 128, 128)
    logit_scale: float = 1 / 9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype, momentum=0.8)
        x = x.astype(self.dtype)
        x = ConvBN(self.stem_width, norm=norm, act=nn.gelu, dtype=self.dtype, name="stem")(x)
        for i, features in enumerate(self.widths, start=1):
            conv = partial(ConvBN, features, norm=norm, act=nn.gelu, dtype=self.dtype)
            x = nn.Conv(features, (3, 3), use_bias=False, dtype=self.dtype, name=f"group{i}_conv")(
                x
            )
            x = MaxPool(2, name=f"group{i}_pool")(x)
            x = nn.gelu(norm(name=f"group{i}_bn")(x))
            x = conv(name=f"group{i}_conv_bn")(x)
        x = jnp.max(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name="head")(x)
        return (logits * self.logit_scale).astype(jnp.float32)


@register
def simple_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    """Keras tutorial CNN (Conv32-pool-Conv64-pool-Dense128)."""
    return SimpleCNN(num_classes=num_classes, **kwargs)


@register
def cifar_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    """Tutorial CIFAR CNN with BatchNorm and dropout."""
    return CifarCNN(num_classes=num_classes, **kwargs)


@register
def fast_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    """Airbench-style speed-run net."""
    return FastCNN(num_classes=num_classes, **kwargs)
