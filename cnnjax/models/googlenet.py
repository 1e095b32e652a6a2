"""GoogLeNet / Inception v1 (Szegedy et al. 2015), torchvision layout without auxiliary heads."""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.models.common import maybe_remat
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool, MaxPool, batch_norm

# (name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj); None marks a 3x3/2 max-pool
# (2x2/2 before stage 5), as in torchvision.
INCEPTIONS = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    None,
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    None,
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's
    "5x5" branch really uses a 3x3 kernel, a known quirk kept for weight compatibility);
    3x3/1 max-pool -> 1x1. Every conv is torchvision's BasicConv2d (bias-free conv, BN, ReLU).
    """

    widths: Sequence[int]  # (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H, W, widths[0] + widths[2] + widths[4] + widths[5])."""
        conv = partial(ConvBN, norm=self.norm, dtype=self.dtype)
        w1, w3r, w3, w5r, w5, wp = self.widths
        b1 = conv(w1, (1, 1), name="branch1")(x)
        b2 = conv(w3r, (1, 1), name="branch2_reduce")(x)
        b2 = conv(w3, (3, 3), padding=1, name="branch2")(b2)
        b3 = conv(w5r, (1, 1), name="branch3_reduce")(x)
        b3 = conv(w5, (3, 3), padding=1, name="branch3")(b3)
        b4 = MaxPool(3, 1, "SAME", name="branch4_pool")(x)
        b4 = conv(wp, (1, 1), name="branch4")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNet(nn.Module):
    """torchvision GoogLeNet (``aux_logits=False``): 6,624,904 parameters at 1000 classes. The
    stride-2 max-pools use torch's ``ceil_mode=True``.

    ``small_input=True`` (28-32 px images) replaces the 7x7/2 stem and its max-pool with a 3x3/1
    stem; the later pools bring 32 px to 4x4 before the last stage.

    Attributes:
      inceptions: the module table (``INCEPTIONS``); narrow it for quick tests.
      stem_widths: channels of conv1, conv2 (1x1) and conv3 (3x3).
      dropout: rate before the classifier.
      transform_input: re-normalise inputs from ImageNet's mean/std to mean 0.5, std 0.5 per
        channel first, as torchvision does for its ImageNet weights (``IMAGENET1K_V1`` was
        trained on inputs in that scale); ``cnnjax.models.pretrained.load`` sets it.
      remat: ``config.remat``; ``blocks[:POLICY]`` rematerialises each inception module.
    """

    num_classes: int = 1000
    inceptions: Sequence[Any] = INCEPTIONS
    stem_widths: Sequence[int] = (64, 64, 192)
    dropout: float = 0.2
    small_input: bool = False
    transform_input: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        norm = batch_norm(train, self.dtype, epsilon=1e-3)
        conv = partial(ConvBN, norm=norm, dtype=self.dtype)
        if self.transform_input:
            x = _imagenet_to_half_scale(x)
        x = x.astype(self.dtype)
        w1, w2, w3 = self.stem_widths
        if self.small_input:
            x = conv(w1, (3, 3), padding=1, name="conv1")(x)
        else:
            x = conv(w1, (7, 7), (2, 2), padding=3, name="conv1")(x)
            x = _ceil_max_pool(x, 3, "pool1")
        x = conv(w2, (1, 1), name="conv2")(x)
        x = conv(w3, (3, 3), padding=1, name="conv3")(x)
        x = _ceil_max_pool(x, 3, "pool2")
        pools = 2
        inception = maybe_remat(Inception, self.remat)
        for row in self.inceptions:
            if row is None:
                pools += 1
                window = 2 if pools == 4 else 3
                x = _ceil_max_pool(x, window, f"pool{pools}")
            else:
                x = inception(row[1:], norm, self.dtype, name=row[0])(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, self.dropout, self.dtype, name="head")(x, train)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_to_half_scale(x):
    """(N, H, W, 3) normalised with ImageNet's mean/std -> normalised with mean = std = 0.5:
    ``x * std / 0.5 + (mean - 0.5) / 0.5`` per channel (torchvision's ``_transform_input``)."""
    std, mean = jnp.asarray(IMAGENET_STD), jnp.asarray(IMAGENET_MEAN)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


def _ceil_max_pool(x, window: int, name: str):
    """2-strided max-pool with torch's ``ceil_mode=True`` (extra -inf padding at the end)."""
    return MaxPool(window, 2, ceil_mode=True, name=name)(x)


@register
def googlenet(num_classes: int = 1000, **kwargs) -> nn.Module:
    """GoogLeNet / Inception v1 (torchvision layout, BN convs, no auxiliary heads)."""
    return GoogLeNet(num_classes=num_classes, **kwargs)
