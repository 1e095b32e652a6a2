"""DenseNet-BC (Huang et al. 2017), torchvision layout."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import bare_conv, maybe_remat
from cnnjax.nn.layers import AvgPool, ConvBN, DenseHead, GlobalAvgPool, MaxPool, batch_norm


class DenseLayer(nn.Module):
    """Pre-activation bottleneck BN-ReLU-Conv1x1(bn_size * growth)-BN-ReLU-Conv3x3(growth); the
    new ``growth_rate`` channels are concatenated to the input."""

    growth_rate: int
    bn_size: int = 4
    drop_rate: float = 0.0
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> (N, H, W, C + growth_rate)."""
        y = nn.relu(self.norm(name="bn1")(x))
        y = ConvBN(
            self.bn_size * self.growth_rate, (1, 1), norm=self.norm, dtype=self.dtype, name="conv1"
        )(y)
        y = bare_conv(self.growth_rate, (3, 3), self.dtype, "conv2")(y)
        y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 halving the channels, then a 2x2/2 average pool."""

    features: int
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H/2, W/2, features)."""
        x = nn.relu(self.norm(name="bn")(x))
        x = bare_conv(self.features, (1, 1), self.dtype, "conv")(x)
        return AvgPool(2, name="pool")(x)


class DenseNet(nn.Module):
    """torchvision DenseNet: 7x7/2 conv stem with BN-ReLU and a 3x3/2 max-pool, dense blocks
    joined by transitions, a final BN-ReLU, global average pool and a dense head.
    DenseNet-121 has 7,978,856 parameters at 1000 classes.

    ``small_input=True`` (28-32 px images) swaps the stem for a 3x3/1 conv without max-pool.

    Attributes:
      growth_rate: channels each layer adds.
      block_config: layers per dense block.
      num_init_features: stem channels.
      bn_size: bottleneck width as a multiple of ``growth_rate``.
      drop_rate: dropout after each dense layer.
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each dense layer.
    """

    num_classes: int = 1000
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    small_input: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype)
        stem = partial(ConvBN, self.num_init_features, norm=norm, dtype=self.dtype, name="stem")
        x = x.astype(self.dtype)
        if self.small_input:
            x = stem((3, 3), padding=1)(x)
        else:
            x = stem((7, 7), (2, 2), padding=3)(x)
            x = MaxPool(3, 2, ((1, 1), (1, 1)), name="stem_pool")(x)
        dense_layer = maybe_remat(DenseLayer, self.remat, static_argnums=(2,))  # (x, train)
        layer = partial(
            dense_layer, self.growth_rate, self.bn_size, self.drop_rate, norm, self.dtype
        )
        for i, n in enumerate(self.block_config, start=1):
            for j in range(1, n + 1):
                x = layer(name=f"block{i}_layer{j}")(x, train)
            if i < len(self.block_config):
                x = Transition(x.shape[-1] // 2, norm, self.dtype, name=f"transition{i}")(x)
        x = nn.relu(norm(name="final_bn")(x))
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


@register
def densenet121(num_classes: int = 1000, **kwargs) -> nn.Module:
    """DenseNet-121 (torchvision layout, growth 32, blocks 6-12-24-16)."""
    return DenseNet(num_classes=num_classes, **kwargs)
