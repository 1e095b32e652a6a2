"""Reusable Linen building blocks (NHWC activations, HWIO kernels).

Every block takes its convolution, normalisation and activation as injected callables so that a
model chooses them once (e.g. ``functools.partial(nn.BatchNorm, momentum=0.9)``) and the blocks
never hard-code them. BatchNorm state lives in the ``batch_stats`` collection: it is updated when
``train=True`` (apply with ``mutable=['batch_stats']``) and read-only otherwise.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.nn import kernels
from cnnjax.nn.pooling import (  # noqa: F401  (re-exported: the pooling layers live there)
    AdaptiveAvgPool,
    AvgPool,
    GlobalAvgPool,
    MaxPool,
    max_pool,
)

ModuleDef = Any
Dtype = Any

# He-normal fan-out, the initialiser torchvision and Flax's ImageNet example use for convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Dtype = jnp.float32, **kwargs) -> ModuleDef:
    """BatchNorm factory with the framework-standard momentum and epsilon.

    Statistics are always kept in float32 (``param_dtype``); ``dtype`` only sets the output.
    ``axis_name`` stays None: under ``jit`` with a batch-sharded array XLA already reduces the
    statistics over the global batch.
    """
    kwargs = {"momentum": 0.9, "epsilon": 1e-5, **kwargs}
    return partial(BatchNorm, train=train, dtype=dtype, **kwargs)


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` that takes its mode as ``train`` instead of ``use_running_average``, so a
    call can still force inference mode (``use_running_average=True``): frozen layers in
    transfer learning rely on it (``cnnjax.run.state.frozen_batch_norm``)."""

    train: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, **kwargs):
        """x: (..., C) normalised over all but the last axis."""
        if use_running_average is None:
            use_running_average = not self.train
        return super().__call__(x, use_running_average=use_running_average, **kwargs)


class ConvBN(nn.Module):
    """Conv -> norm -> activation, the unit every CNN here is made of.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: anything ``nn.Conv`` accepts.
      groups: feature groups (``features == in_channels == groups`` is depthwise).
      norm: a norm factory (``batch_norm(train)``); None for no norm (then the conv has a bias).
      act: activation; None for identity.
      scale_init: init of the norm scale (``nn.initializers.zeros`` zero-inits a residual branch).
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    groups: int = 1
    norm: ModuleDef | None = None
    act: Callable | None = nn.relu
    scale_init: Callable = nn.initializers.ones
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H', W', features)."""
        x = nn.Conv(
            self.features,
            tuple(self.kernel_size),
            tuple(self.strides),
            padding=self.padding,
            feature_group_count=self.groups,
            use_bias=self.norm is None,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            conv_general_dilated=kernels.conv_general_dilated,  # XLA's or oneDNN's (CPU)
            name="conv",
        )(x)
        if self.norm is not None:
            x = self.norm(scale_init=self.scale_init, name="bn")(x)
        return x if self.act is None else self.act(x)


class ResidualBlock(nn.Module):
    """Basic residual block (two 3x3 convs), ResNet-18/34 and CIFAR ResNets.

    ``shortcut='projection'`` uses a 1x1 conv + norm when the shape changes (option B, ImageNet
    ResNets); ``shortcut='pad'`` subsamples and zero-pads channels (option A, He et al. 2016 CIFAR
    ResNets, no parameters).
    """

    features: int
    strides: int = 1
    norm: ModuleDef = None
    act: Callable = nn.relu
    zero_init_residual: bool = False
    shortcut: str = "projection"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features)."""
        conv = partial(ConvBN, norm=self.norm, dtype=self.dtype)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        # Torch's symmetric padding: Flax's "SAME" would pad a stride-2 conv bottom/right only.
        y = conv(
            self.features, strides=(self.strides,) * 2, padding=1, act=self.act, name="conv_bn1"
        )(x)
        y = conv(self.features, padding=1, act=None, scale_init=last_scale, name="conv_bn2")(y)
        return self.act(y + shortcut(self, x, self.features, self.strides))


class BottleneckBlock(nn.Module):
    """Bottleneck block 1x1 -> 3x3 -> 1x1 (x4 expansion), ResNet-50/101/152 and Wide ResNets.

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"). ``width`` defaults to
    ``features`` (Wide ResNet-50-2 doubles it).
    """

    features: int
    strides: int = 1
    width: int | None = None
    expansion: int = 4
    norm: ModuleDef = None
    act: Callable = nn.relu
    zero_init_residual: bool = False
    shortcut: str = "projection"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H/strides, W/strides, features * expansion)."""
        conv = partial(ConvBN, norm=self.norm, dtype=self.dtype)
        width = self.width or self.features
        out = self.features * self.expansion
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = conv(width, (1, 1), act=self.act, name="conv_bn1")(x)
        # Torch's symmetric padding: Flax's "SAME" would pad a stride-2 conv bottom/right only.
        y = conv(width, strides=(self.strides,) * 2, padding=1, act=self.act, name="conv_bn2")(y)
        y = conv(out, (1, 1), act=None, scale_init=last_scale, name="conv_bn3")(y)
        return self.act(y + shortcut(self, x, out, self.strides))


def shortcut(block: nn.Module, x, features: int, strides: int):
    """The identity path of a residual block, reshaped when the block changes the shape."""
    if x.shape[-1] == features and strides == 1:
        return x
    if block.shortcut == "pad":
        x = x[:, ::strides, ::strides, :]
        extra = features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    proj = ConvBN(
        features,
        (1, 1),
        (strides, strides),
        padding=0,
        norm=block.norm,
        act=None,
        dtype=block.dtype,
        name="proj",
    )
    return proj(x)


class DenseHead(nn.Module):
    """Classifier head: optional dropout, then a dense layer to ``num_classes`` float32 logits."""

    num_classes: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, D) -> logits (N, num_classes), always float32 for a stable softmax."""
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
