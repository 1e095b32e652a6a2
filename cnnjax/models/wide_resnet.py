"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), pre-activation blocks."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import bare_conv, maybe_remat
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool, batch_norm


class PreActBlock(nn.Module):
    """BN-ReLU-Conv3x3-BN-ReLU-(dropout)-Conv3x3 plus the identity; when the shape changes the
    shortcut is a bias-free 1x1 conv applied to the pre-activated input (the reference
    implementation's ``convShortcut``)."""

    features: int
    strides: int = 1
    dropout: float = 0.0
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features)."""
        s = (self.strides,) * 2
        pre = nn.relu(self.norm(name="bn1")(x))
        y = ConvBN(self.features, (3, 3), s, 1, norm=self.norm, dtype=self.dtype, name="conv1")(pre)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = bare_conv(self.features, (3, 3), self.dtype, "conv2")(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = bare_conv(self.features, (1, 1), self.dtype, "proj", s)(pre)
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3/16 stem, three stages of ``(depth - 4) / 6`` pre-activation blocks with
    16k/32k/64k channels (strides 1, 2, 2), final BN-ReLU, global average pool, dense head.
    WRN-28-10 has 36,479,194 parameters at 10 classes, as the reference PyTorch code.

    Attributes:
      depth: 6n + 4.
      widen_factor: k.
      dropout: rate between the two convs of each block (0.3 in the paper's dropout runs; the
        reference code defaults to 0).
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each block.
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        if (self.depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        norm = batch_norm(train, self.dtype)
        x = bare_conv(16, (3, 3), self.dtype, "stem")(x.astype(self.dtype))
        pre_act_block = maybe_remat(PreActBlock, self.remat, static_argnums=(2,))  # (x, train)
        for i in range(3):
            features = 16 * 2**i * self.widen_factor
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                block = pre_act_block(
                    features,
                    strides,
                    self.dropout,
                    norm,
                    self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )
                x = block(x, train)
        x = nn.relu(norm(name="final_bn")(x))
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


@register
def wrn28_10(num_classes: int = 10, **kwargs) -> nn.Module:
    """WRN-28-10 for CIFAR (36.5M parameters)."""
    return WideResNet(**{"depth": 28, "widen_factor": 10, **kwargs}, num_classes=num_classes)
