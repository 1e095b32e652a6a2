"""Analytic backward passes of conv2d, max_pool and avg_pool, written from the formulas.

No autodiff here: each function builds the gradient the way a textbook derives it, and the
tests check it against `jax.vjp` of the forward op.

Notation for one spatial axis: input size n, padding (lo, hi), kernel k, dilation d,
k_eff = d(k - 1) + 1, stride s, m outputs. Output p, tap i reads padded pixel p*s + i*d.
When n + lo + hi - k_eff is not a multiple of s, the last `r = (n + lo + hi - k_eff) % s`
pixels are read by no window and get zero gradient.
"""

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.nn.ops.conv import DIMENSION_NUMBERS, conv_window, extract_patches, tap_index
from cnnjax.nn.ops.pool import lowest, pool_window, valid_counts
from cnnjax.nn.ops.shapes import Window, effective_kernel_size


def _check_dy(dy: jax.Array, expected: tuple[int, ...]) -> None:
    if dy.shape != expected:
        raise ValueError(f"dy must have the forward output's shape {expected}, got {dy.shape}")


def conv2d_backward(x, w, dy, *, stride=1, padding="VALID", dilation=1, groups=1):
    """Gradients of `conv2d` with respect to its input, kernel and bias.

    Args:
        x: (N, H, W, C) forward input.
        w: (KH, KW, C // groups, O) kernel.
        dy: (N, OH, OW, O) gradient of the loss with respect to the conv output.
        stride, padding, dilation, groups: as in `conv2d`.

    Returns:
        (dx, dw, db) with shapes (N, H, W, C), (KH, KW, C // groups, O) and (O,).
    """
    win = conv_window(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    _check_dy(dy, (x.shape[0], *win.out, w.shape[3]))
    dx = _conv_input_grad(dy, w, win, x.shape[1:3], groups)
    dw = _conv_kernel_grad(x, dy, win, groups)[: w.shape[0], : w.shape[1]]
    return dx, dw, dy.sum(axis=(0, 1, 2))


def _conv_kernel_grad(x, dy, win: Window, groups: int) -> jax.Array:
    """dw[i, j, c, o] = sum_{n,p,q} xpad[n, p*s + i*d, q*s + j*d, c] dy[n, p, q, o].

    That is the padded input correlated with dy dilated by the stride (`rhs_dilation=s`),
    sampled every d pixels (`window_strides=d`). The batch axis N is what gets summed, so it
    plays the feature role and C plays the batch role ("CHWN"); `batch_group_count` keeps
    input channel group g paired with output group g. Unread trailing pixels make the
    result up to floor(r / d) taps too large; the caller crops it to (KH, KW).
    """
    return lax.conv_general_dilated(
        x,
        dy,
        window_strides=win.dilation,
        padding=win.padding,
        rhs_dilation=win.stride,
        dimension_numbers=("CHWN", "IHWO", "HWNC"),
        batch_group_count=groups,
    )


def _flip_transpose(w: jax.Array, groups: int) -> jax.Array:
    """Kernel rotated 180 degrees with in/out channels swapped within each group.

    (KH, KW, C/G, G*O/G) -> (KH, KW, O/G, G*C/G).
    """
    kh, kw, c_g, c_out = w.shape
    w = w.reshape(kh, kw, c_g, groups, c_out // groups).transpose(0, 1, 4, 3, 2)
    return w.reshape(kh, kw, c_out // groups, groups * c_g)[::-1, ::-1]


def _conv_input_grad(dy, w, win: Window, in_hw, groups: int) -> jax.Array:
    """dx = full convolution of stride-dilated dy with the flipped, transposed kernel.

    dy dilated by s has a sample at p*s; padded pixel t collects dy[p] w[i] for t = p*s + i*d,
    i.e. a correlation with the flipped kernel after padding dy by k_eff - 1. Shifting by the
    forward padding (x pixel h is padded pixel h + lo) gives pads (k_eff-1-lo, k_eff-1-hi+r).
    They can be negative (forward padding > k_eff - 1): those padded rows are simply cropped.
    """
    pads = []
    for n, k, d, s, lohi in zip(
        in_hw, win.size, win.dilation, win.stride, win.padding, strict=True
    ):
        k_eff = effective_kernel_size(k, d)
        r = (n + sum(lohi) - k_eff) % s  # trailing pixels no window reads
        pads.append((k_eff - 1 - lohi[0], k_eff - 1 - lohi[1] + r))
    return lax.conv_general_dilated(
        dy,
        _flip_transpose(w, groups),
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=win.stride,
        rhs_dilation=win.dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _unslice(index: slice, size: int) -> tuple[int, int, int]:
    """lax.pad config (low, high, interior) that undoes a strided slice of a `size` axis."""
    return index.start, size - index.stop, index.step - 1


def fold_patches(cols: jax.Array, win: Window, x_shape: tuple[int, ...]) -> jax.Array:
    """Transpose of `extract_patches` (col2im): adds every tap back onto the pixel it read.

    Each tap was read with a strided slice, whose transpose is a pad with stride - 1 zeros
    between samples. Overlapping windows accumulate; whatever lands on padding is cropped.

    Args:
        cols: (N, OH, OW, KH, KW, C) per-tap values.
        win: the forward window.
        x_shape: (N, H, W, C) of the forward input.

    Returns:
        (N, H, W, C).
    """
    n, h, w, c = x_shape
    (top, bottom), (left, right) = win.padding
    hp, wp = h + top + bottom, w + left + right
    xp = jnp.zeros((n, hp, wp, c), cols.dtype)
    for i in range(win.size[0]):
        for j in range(win.size[1]):
            _, rows, columns = tap_index(win, i, j)
            config = ((0, 0, 0), _unslice(rows, hp), _unslice(columns, wp), (0, 0, 0))
            xp = xp + lax.pad(cols[:, :, :, i, j], jnp.zeros((), cols.dtype), config)
    return xp[:, top : top + h, left : left + w]


def max_pool_backward(x, dy, window, stride=None, padding="VALID") -> jax.Array:
    """Gradient of `max_pool`: each output gradient goes to the winner of its window only.

    Tie rule: when several pixels of one window share the maximum, the first in row-major
    window order (top-most, then left-most) gets all of it. That is what XLA does for
    `jax.vjp(max_pool)`: its select_and_scatter keeps the current pick while `current >= next`.
    A pixel that wins several overlapping windows accumulates all their gradients.

    Args:
        x: (N, H, W, C) forward input.
        dy: (N, OH, OW, C) gradient with respect to the pooled output.
        window, stride, padding: as in `max_pool`.

    Returns:
        dx: (N, H, W, C).
    """
    win = pool_window(x, window, stride, padding)
    patches = extract_patches(x, win, lowest(x.dtype))
    n, oh, ow, kh, kw, c = patches.shape
    _check_dy(dy, (n, oh, ow, c))
    # argmax returns the first maximum of the row-major flattened window: the tie rule above.
    first_max = jnp.argmax(patches.reshape(n, oh, ow, kh * kw, c), axis=3)
    winner = jax.nn.one_hot(first_max, kh * kw, axis=3, dtype=dy.dtype)
    cols = (winner * dy[:, :, :, None, :]).reshape(patches.shape)
    return fold_patches(cols, win, x.shape)


def avg_pool_backward(x, dy, window, stride=None, padding="VALID") -> jax.Array:
    """Gradient of `avg_pool`: dy / count spread evenly over the real pixels of each window.

    Args:
        x: (N, H, W, C) forward input (only its shape is used).
        dy: (N, OH, OW, C) gradient with respect to the pooled output.
        window, stride, padding: as in `avg_pool`.

    Returns:
        dx: (N, H, W, C).
    """
    win = pool_window(x, window, stride, padding)
    n, _, _, c = x.shape
    _check_dy(dy, (n, *win.out, c))
    share = dy / valid_counts(x.shape[1:3], win).astype(dy.dtype)
    # Taps that fall on padding are cropped by the fold, so only real pixels receive a share.
    cols = jnp.broadcast_to(share[:, :, :, None, None, :], (n, *win.out, *win.size, c))
    return fold_patches(cols, win, x.shape)
