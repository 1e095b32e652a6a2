"""LeNet-5 (LeCun et al. 1998)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import register
from cnnjax.nn.layers import AvgPool, ConvBN, DenseHead


class LeNet5(nn.Module):
    """Classic LeNet-5: conv5x5(6) -> avg-pool -> conv5x5(16) -> avg-pool -> FC120 -> FC84 ->
    FC(num_classes), tanh throughout (plain average pools and a fully connected C3, as most
    re-implementations; the paper's trainable subsampling and partial C3 table are left out).
    61,706 parameters at 32x32x1 and 10 classes.

    Inputs smaller than 32 px (MNIST's 28x28) are padded on the first conv (SAME), which is how
    the paper framed MNIST digits in 32x32; the flattened features stay 5x5x16 and the count
    stays 61,706.

    Attributes:
      first_padding: padding of the first conv; None picks SAME below 32 px and VALID otherwise.
    """

    num_classes: int = 10
    first_padding: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, C) -> logits (N, num_classes)."""
        padding = self.first_padding or ("SAME" if x.shape[1] < 32 else "VALID")
        x = x.astype(self.dtype)
        x = ConvBN(6, (5, 5), padding=padding, act=nn.tanh, dtype=self.dtype, name="conv1")(x)
        x = AvgPool(2, name="pool1")(x)
        x = ConvBN(16, (5, 5), padding="VALID", act=nn.tanh, dtype=self.dtype, name="conv2")(x)
        x = AvgPool(2, name="pool2")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.tanh(nn.Dense(120, dtype=self.dtype, name="fc1")(x))
        x = nn.tanh(nn.Dense(84, dtype=self.dtype, name="fc2")(x))
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


@register
def lenet5(num_classes: int = 10, **kwargs) -> nn.Module:
    """LeNet-5 (tanh, average pools; 61,706 parameters at 32x32x1)."""
    return LeNet5(num_classes=num_classes, **kwargs)
