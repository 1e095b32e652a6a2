"""Small helpers shared by the zoo's families (not models; nothing here registers).

Candidates for ``cnnjax.layers`` / ``cnnjax.pooling`` once the lead integrates them.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from cnnjax.layers import conv_kernel_init


def _adaptive_avg_pool_axis(x, axis: int, out: int):
    """Torch's adaptive average pooling along one axis: window i spans
    ``[floor(i * n / out), ceil((i + 1) * n / out))``."""
    n = x.shape[axis]
    if n == out:
        return x
    if n % out == 0:
        shape = x.shape[:axis] + (out, n // out) + x.shape[axis + 1 :]
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    windows = [
        jnp.mean(
            lax.slice_in_dim(x, i * n // out, math.ceil((i + 1) * n / out), axis=axis),
            axis=axis,
            keepdims=True,
        )
        for i in range(out)
    ]
    return jnp.concatenate(windows, axis=axis)


def adaptive_avg_pool(x, output_size: int | Sequence[int]):
    """``torch.nn.AdaptiveAvgPool2d`` for NHWC: (N, H, W, C) -> (N, oh, ow, C).

    Works for any H, W (smaller than the output too: windows then overlap and repeat pixels, as
    in torch). The mean is separable, so pooling rows then columns gives torch's windows exactly.
    Averages in float32 and casts back.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    y = _adaptive_avg_pool_axis(x.astype(jnp.float32), 1, oh)
    return _adaptive_avg_pool_axis(y, 2, ow).astype(x.dtype)


class AdaptiveAvgPool(nn.Module):
    """``adaptive_avg_pool`` as a module, so it is named in summaries and captured features."""

    output_size: int | Sequence[int] = 1

    def __call__(self, x):
        """x: (N, H, W, C) -> (N, oh, ow, C)."""
        return adaptive_avg_pool(x, self.output_size)


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


def ceil_pool_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """(low, high) padding that makes a VALID pool behave like torch's ``ceil_mode=True``: the
    output is ``ceil((size - window) / stride) + 1``, minus the last window if it would start
    beyond the input."""
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:
        out -= 1
    return 0, max(0, (out - 1) * stride + window - size)


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
        name=name,
    )
