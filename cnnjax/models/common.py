"""Small helpers shared by the zoo's families (not models; nothing here registers). Pooling,
adaptive and ceil-mode included, lives in ``cnnjax.pooling``."""

from collections.abc import Sequence

import flax.linen as nn

from cnnjax import kernels
from cnnjax.layers import conv_kernel_init


def drop_path(rate: float, name: str | None = None) -> nn.Dropout:
    """Stochastic depth (torchvision ``StochasticDepth(p, "row")``): in training, zero a whole
    residual branch per example with probability ``rate`` and scale survivors by
    ``1 / (1 - rate)``; identity in eval. Call the result as ``drop(x, deterministic=not train)``;
    it draws from the ``dropout`` rng collection.
    """
    # Broadcasting the mask over H, W and C drops whole examples of an NHWC tensor.
    return nn.Dropout(rate, broadcast_dims=(1, 2, 3), name=name)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of ``divisor`` without losing more than 10%
    (torchvision's ``_make_divisible``, used by MobileNet and EfficientNet width scaling)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def torch_padding(kernel_size: int | Sequence[int], stride: int = 1, dilation: int = 1):
    """Torch's symmetric ``padding = dilation * (k - 1) // 2`` on both sides, as Flax explicit
    ``((p, p), (p, p))`` pairs (for odd kernels).

    Flax's ``"SAME"`` equals it at stride 1 but pads a stride-2 layer unevenly (all of the
    padding at the bottom/right when the size is even), which shifts every window by one pixel
    against torch: weights trained in torch need the torch padding. ``stride`` is accepted so a
    call names the layer it pads; the padding does not depend on it.
    """
    del stride
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    return tuple((dilation * (k - 1) // 2,) * 2 for k in ks)


def bare_conv(features: int, kernel_size: Sequence[int], dtype, name: str, strides=(1, 1)):
    """A bias-free conv with torch's symmetric ``k // 2`` padding, for pre-activation blocks
    (norm -> act -> conv), where ``ConvBN``'s conv -> norm -> act order does not fit."""
    return nn.Conv(
        features,
        tuple(kernel_size),
        tuple(strides),
        padding=kernel_size[0] // 2,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        conv_general_dilated=kernels.conv_general_dilated,  # XLA's or oneDNN's (CPU)
        name=name,
    )
