"""AlexNet, torchvision's single-tower variant (Krizhevsky 2014, "One weird trick")."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.nn.layers import AdaptiveAvgPool, ConvBN, DenseHead, MaxPool


class AlexNet(nn.Module):
    """torchvision AlexNet: five biased convs with ReLU (no norm), three 3x3/2 max-pools, an
    adaptive average pool to 6x6 and a 4096-4096 classifier with dropout before each hidden
    layer. 61,100,840 parameters at 1000 classes. Flattening is (H, W, C) order, NHWC's own:
    ``cnnjax.models.pretrained`` permutes fc1's input rows from torch's (C, H, W) when it loads
    torchvision weights.

    ``small_input=True`` (28-32 px images) replaces the 11x11/4 stem and its max-pool with a 3x3/1
    stem, pools to 1x1 and narrows the classifier to 512 units (both overridable).

    Attributes:
      widths: channels of the five convs.
      pool_size: side of the adaptive average pool (None: 6, or 1 with ``small_input``).
      classifier_width: hidden units of the classifier (None: 4096, or 512 with ``small_input``).
      dropout: rate before each hidden dense layer.
    """

    num_classes: int = 1000
    widths: Sequence[int] = (64, 192, 384, 256, 256)
    pool_size: int | None = None
    classifier_width: int | None = None
    dropout: float = 0.5
    small_input: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        x = self.features(x.astype(self.dtype))
        pool_size = self.pool_size or (1 if self.small_input else 6)
        x = AdaptiveAvgPool(pool_size, name="avgpool")(x)
        x = x.reshape(x.shape[0], -1)
        width = self.classifier_width or (512 if self.small_input else 4096)
        for i in (1, 2):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i}")(x))
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)

    def features(self, x):
        """(N, H, W, 3) -> (N, H', W', widths[-1]): convs with torch's symmetric padding."""
        w = self.widths
        conv = lambda features, k, name: ConvBN(
            features, (k, k), padding=k // 2, dtype=self.dtype, name=name
        )
        if self.small_input:
            x = conv(w[0], 3, "conv1")(x)
        else:
            x = ConvBN(w[0], (11, 11), (4, 4), padding=2, dtype=self.dtype, name="conv1")(x)
            x = MaxPool(3, 2, name="pool1")(x)
        x = conv(w[1], 5, "conv2")(x)
        x = MaxPool(3, 2, name="pool2")(x)
        x = conv(w[2], 3, "conv3")(x)
        x = conv(w[3], 3, "conv4")(x)
        x = conv(w[4], 3, "conv5")(x)
        return MaxPool(3, 2, name="pool5")(x)


@register
def alexnet(num_classes: int = 1000, **kwargs) -> nn.Module:
    """AlexNet (torchvision layout, 61.1M parameters at 1000 classes)."""
    return AlexNet(num_classes=num_classes, **kwargs)
