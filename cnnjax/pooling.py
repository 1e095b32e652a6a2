"""Pooling used by the models (the fast path; from-scratch versions live in ``cnnjax.ops``).

On XLA:CPU the gradient of ``nn.max_pool`` lowers to ``select_and_scatter``, a scalar loop that
costs tens of milliseconds per step for a 28x28x32 batch of 128 (more than both convolutions).
Pooling with non-overlapping windows (stride == window, the common 2x2/2 case) needs no scatter:
each input element belongs to exactly one window, so the forward is a reshape + max and the
backward an elementwise select. ``max_pool`` takes that path when it applies and falls back to
``nn.max_pool`` otherwise.
"""

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

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
