"""2-D pooling (NHWC): `lax.reduce_window` versions and from-scratch twins.

Padding follows Keras: max pooling ignores padded pixels (they are -inf) and average
pooling divides by the number of real pixels in each window, not by the window size.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.nn.ops.conv import extract_patches
from cnnjax.nn.ops.shapes import PaddingLike, Window, resolve_window


def check_nhwc(x: jax.Array) -> None:
    """Raises ValueError unless x is rank 4 (N, H, W, C)."""
    if x.ndim != 4:
        raise ValueError(f"x must be (N, H, W, C), got shape {x.shape}")


def pool_window(
    x: jax.Array,
    window: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: PaddingLike,
) -> Window:
    """Checks x is (N, H, W, C) and resolves the window; `stride` defaults to `window`."""
    check_nhwc(x)
    stride = window if stride is None else stride
    return resolve_window(x.shape[1:3], window, stride=stride, padding=padding)


def lowest(dtype) -> np.ndarray:
    """Identity of max for `dtype`: -inf for floats, the minimum for ints."""
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.array(-np.inf, dtype)
    return np.array(jnp.iinfo(dtype).min, dtype)


def valid_counts(in_hw: tuple[int, int], win: Window) -> np.ndarray:
    """Real (non-padding) pixels under each window, as an (OH, OW, 1) array.

    Static: it depends only on shapes, so it is computed once in numpy, not per step.
    A window lying wholly in padding counts 1, so it averages to 0 instead of 0/0.
    """
    per_axis = []
    for n, k, s, (lo, _), out in zip(
        in_hw, win.size, win.stride, win.padding, win.out, strict=True
    ):
        start = np.arange(out) * s - lo
        per_axis.append(np.minimum(start + k, n) - np.maximum(start, 0))
    return np.maximum(np.outer(*per_axis), 1)[:, :, None]


def _reduce(x: jax.Array, init: np.ndarray, op, win: Window) -> jax.Array:
    return lax.reduce_window(
        x, init, op, (1, *win.size, 1), (1, *win.stride, 1), ((0, 0), *win.padding, (0, 0))
    )


def max_pool(x, window, stride=None, padding="VALID") -> jax.Array:
    """Max pooling.

    Args:
        x: (N, H, W, C).
        window: int or (kh, kw).
        stride: int or pair; defaults to `window`.
        padding: "SAME" / "VALID" (any case), an int, or ((top, bottom), (left, right)).

    Returns:
        (N, OH, OW, C).
    """
    win = pool_window(x, window, stride, padding)
    return _reduce(x, lowest(x.dtype), lax.max, win)


def avg_pool(x, window, stride=None, padding="VALID") -> jax.Array:
    """Average pooling over the real pixels of each window (Keras semantics at SAME borders).

    Args/Returns: as `max_pool`.
    """
    win = pool_window(x, window, stride, padding)
    total = _reduce(x, np.array(0, x.dtype), lax.add, win)
    return total / valid_counts(x.shape[1:3], win).astype(x.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W: (N, H, W, C) -> (N, C)."""
    check_nhwc(x)
    return avg_pool(x, x.shape[1:3])[:, 0, 0, :]


def max_pool_naive(x, window, stride=None, padding="VALID") -> jax.Array:
    """From-scratch twin of `max_pool`: the max of every extracted window."""
    win = pool_window(x, window, stride, padding)
    return extract_patches(x, win, lowest(x.dtype)).max(axis=(3, 4))


def avg_pool_naive(x, window, stride=None, padding="VALID") -> jax.Array:
    """From-scratch twin of `avg_pool`: window sums over window counts of real pixels."""
    win = pool_window(x, window, stride, padding)
    total = extract_patches(x, win).sum(axis=(3, 4))
    # Pooling a mask of ones the same way counts the real pixels under each window.
    count = extract_patches(jnp.ones_like(x[..., :1]), win).sum(axis=(3, 4))
    return total / jnp.maximum(count, 1)


def global_avg_pool_naive(x: jax.Array) -> jax.Array:
    """From-scratch twin of `global_avg_pool`: sum over H and W divided by H * W."""
    check_nhwc(x)
    return x.sum(axis=(1, 2)) / (x.shape[1] * x.shape[2])
