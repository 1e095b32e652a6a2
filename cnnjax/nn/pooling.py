"""Every pooling the models use, as functions and as named Linen modules (re-exported by
``cnnjax.nn.layers``); ``cnnjax.nn.ops.pool`` is the from-scratch reference the tests hold them to.
One keyword convention throughout, Flax's: ``window``, ``strides`` (default: the window),
``padding`` ("VALID", "SAME" or explicit ``((lo, hi), (lo, hi))`` pairs).

- ``max_pool`` / ``MaxPool`` (``ceil_mode=True``: torch's ceil-mode output size);
- ``avg_pool`` / ``AvgPool``: the zero padding counts in the mean, as torch's default;
- ``GlobalAvgPool``: mean over the spatial axes;
- ``adaptive_avg_pool`` / ``AdaptiveAvgPool``: torch's ``AdaptiveAvgPool2d``.

On XLA:CPU the gradient of ``nn.max_pool`` lowers to ``select_and_scatter``, a scalar loop that
costs tens of milliseconds per step for a 28x28x32 batch of 128 (more than both convolutions).
Pooling with non-overlapping windows (stride == window, the common 2x2/2 case) needs no scatter:
each input element belongs to exactly one window, so the forward is a reshape + max and the
backward an elementwise select. ``max_pool`` takes that path when it applies and falls back to
``nn.max_pool`` otherwise.
"""

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.errors import InputTooSmallError


def max_pool(x, window=(2, 2), strides=None, padding="VALID"):
    """Max pooling over NHWC ``x``; ``strides`` defaults to ``window``.

    Args:
      x: (..., H, W, C), any float dtype (preserved).
      window: (kh, kw).
      strides: (sh, sw); None means ``window``.
      padding: "VALID", "SAME" or explicit ``((lo, hi), (lo, hi))`` pairs, as ``nn.max_pool``.

    Returns:
      (..., H', W', C), equal to ``nn.max_pool(x, window, strides, padding)``. Gradients are
      equal too: a tied window sends its gradient to the first maximum in row-major order, as
      XLA's ``select_and_scatter`` does.
    """
    window = tuple(window)
    strides = tuple(strides or window)
    if _is_tiled(x.shape, window, strides, padding):
        return tiled_max_pool(x, window)
    return nn.max_pool(x, window, strides, padding)


def _is_tiled(shape, window, strides, padding) -> bool:
    """Whether the pool is a tiling (stride == window, no padding) that the fast path computes."""
    if len(window) != 2 or strides != window or len(shape) < 3:
        return False
    if padding == "VALID":
        return True
    h, w = shape[-3], shape[-2]
    if padding == "SAME":  # pads nothing exactly when the window divides the size
        return h % window[0] == 0 and w % window[1] == 0
    if isinstance(padding, Sequence) and not isinstance(padding, str):
        return all(tuple(p) == (0, 0) for p in padding)
    return False


def tiled_max_pool(x, window=(2, 2)):
    """Non-overlapping ``window`` max pool of (..., H, W, C), VALID (a remainder is cropped).

    The cropped rows/columns get a zero gradient, as with ``nn.max_pool(..., padding='VALID')``.
    """
    kh, kw = window
    h, w = x.shape[-3] // kh * kh, x.shape[-2] // kw * kw
    if h == 0 or w == 0:
        raise InputTooSmallError(f"window {window} is larger than the input {x.shape[-3:-1]}")
    cropped = x[..., :h, :w, :]  # a no-op slice (no copy) when the window divides the size
    return _tiled_max(cropped, kh, kw)


def _windows(x, kh: int, kw: int):
    """(..., H, W, C) -> (..., H/kh, kh, W/kw, kw, C): a free reshape, no transpose."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // kh, kh, w // kw, kw, c)


def _first_max_mask(xw, y):
    """Boolean mask of the first maximum of every window (row-major), no scatter, no argmax.

    xw: (..., Ho, kh, Wo, kw, C) windows; y: (..., Ho, Wo, C) their maxima. Walks the kh*kw
    window positions (static, 4 for 2x2) keeping a running "already found" flag per window.
    """
    kh, kw = xw.shape[-4], xw.shape[-2]
    found = jnp.zeros(y.shape, bool)
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            hit = xw[..., i, :, j, :] == y
            cols.append(hit & ~found)
            found = found | hit
        rows.append(jnp.stack(cols, axis=-2))  # (..., Ho, Wo, kw, C)
    return jnp.stack(rows, axis=-4)  # (..., Ho, kh, Wo, kw, C)


def _max_of_windows(x, kh: int, kw: int):
    return jnp.max(_windows(x, kh, kw), axis=(-4, -2))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _tiled_max(x, kh: int, kw: int):
    """(..., H, W, C) with H % kh == W % kw == 0 -> (..., H/kh, W/kw, C)."""
    return _max_of_windows(x, kh, kw)


def _tiled_max_fwd(x, kh, kw):
    y = _max_of_windows(x, kh, kw)
    return y, (x, y)


def _tiled_max_bwd(kh, kw, res, g):
    x, y = res
    mask = _first_max_mask(_windows(x, kh, kw), y)
    dx = jnp.where(mask, jnp.expand_dims(g, (-4, -2)), jnp.zeros((), g.dtype))
    return (dx.reshape(x.shape),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


class MaxPool(nn.Module):
    """``max_pool`` as a module, so it shows up (and is named) in summaries and captured
    features. ``ceil_mode`` pads the end with -inf so the output size is torch's
    ``ceil_mode=True`` size (on top of ``padding``, which must then be explicit or VALID)."""

    window: int = 2
    strides: int | None = None
    padding: Any = "VALID"
    ceil_mode: bool = False

    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H', W', C)."""
        s = self.strides or self.window
        padding = self.padding
        if self.ceil_mode:
            base = ((0, 0), (0, 0)) if padding == "VALID" else tuple(map(tuple, padding))
            padding = tuple(
                (lo, hi + ceil_pool_padding(n + lo + hi, self.window, s)[1])
                for n, (lo, hi) in zip(x.shape[1:3], base, strict=True)
            )
        return max_pool(x, (self.window,) * 2, (s, s), padding)


def avg_pool(x, window=(2, 2), strides=None, padding="VALID"):
    """Average pooling over NHWC ``x`` (padded zeros count in the mean, as in torch's default
    ``count_include_pad=True``); ``strides`` defaults to ``window``."""
    window = tuple(window)
    return nn.avg_pool(x, window, tuple(strides or window), padding, count_include_pad=True)


class AvgPool(nn.Module):
    """``avg_pool`` as a named module."""

    window: int = 2
    strides: int | None = None
    padding: Any = "VALID"

    def __call__(self, x):
        """x: (N, H, W, C) -> (N, H', W', C)."""
        s = self.strides or self.window
        return avg_pool(x, (self.window,) * 2, (s, s), self.padding)


class GlobalAvgPool(nn.Module):
    """(N, H, W, C) -> (N, C): mean over the spatial axes, in float32 for a stable sum."""

    @nn.compact
    def __call__(self, x):
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


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


def ceil_pool_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """(low, high) padding that makes a VALID pool behave like torch's ``ceil_mode=True``: the
    output is ``ceil((size - window) / stride) + 1``, minus the last window if it would start
    beyond the input."""
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:
        out -= 1
    return 0, max(0, (out - 1) * stride + window - size)
