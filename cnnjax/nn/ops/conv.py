"""2-D convolution (NHWC inputs, HWIO kernels): the XLA primitive and a from-scratch twin.

`conv2d` is what models use. `conv2d_naive` spells out the same sum with explicit patch
extraction, so it can be read next to the maths and checked against `conv2d`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.nn.ops.shapes import PaddingLike, Window, resolve_window

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv_window(
    x: jax.Array,
    w: jax.Array,
    *,
    stride: int | tuple[int, int],
    padding: PaddingLike,
    dilation: int | tuple[int, int],
    groups: int,
) -> Window:
    """Checks conv operand shapes and resolves the window geometry.

    Args:
        x: (N, H, W, C) input.
        w: (KH, KW, C // groups, O) kernel.

    Raises:
        ValueError: on wrong ranks, channel counts that do not match or do not divide by
            `groups`, or bad window arguments.
    """
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"need x (N, H, W, C) and w (KH, KW, I, O), got {x.shape} and {w.shape}")
    c, (c_in, c_out) = x.shape[3], w.shape[2:]
    if groups < 1 or c % groups or c_out % groups:
        raise ValueError(f"channels C={c} and O={c_out} must be divisible by groups={groups}")
    if c != c_in * groups:
        raise ValueError(f"channel mismatch: x C={c} != w I={c_in} * groups={groups}")
    return resolve_window(
        x.shape[1:3], w.shape[:2], stride=stride, padding=padding, dilation=dilation
    )


def _add_bias(y: jax.Array, b: jax.Array | None) -> jax.Array:
    if b is None:
        return y
    if b.shape != (y.shape[-1],):
        raise ValueError(f"bias must have shape ({y.shape[-1]},), got {b.shape}")
    return y + b


def conv2d(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1) -> jax.Array:
    """2-D cross-correlation via `lax.conv_general_dilated`.

    Args:
        x: (N, H, W, C) input.
        w: (KH, KW, C // groups, O) kernel.
        b: optional (O,) bias.
        stride: int or (sh, sw).
        padding: "SAME" / "VALID" (any case), an int for every side, or
            ((top, bottom), (left, right)). SAME follows XLA/TF: out = ceil(n / s), the
            extra pixel of padding goes at the bottom/right.
        dilation: kernel dilation, int or (dh, dw).
        groups: feature groups; groups == C gives a depthwise convolution.

    Returns:
        (N, OH, OW, O) output.
    """
    win = conv_window(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=win.stride,
        padding=win.padding,
        rhs_dilation=win.dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        feature_group_count=groups,
    )
    return _add_bias(y, b)


def tap_index(win: Window, i: int, j: int) -> tuple[slice, slice, slice]:
    """Index into a padded (N, H, W, C) array of the pixels kernel tap (i, j) reads.

    Tap (i, j) of output (p, q) reads padded pixel (p * sh + i * dh, q * sw + j * dw), so
    over all outputs it reads one strided slice per axis.
    """
    (sh, sw), (dh, dw), (oh, ow) = win.stride, win.dilation, win.out
    rows = slice(i * dh, i * dh + (oh - 1) * sh + 1, sh)
    cols = slice(j * dw, j * dw + (ow - 1) * sw + 1, sw)
    return slice(None), rows, cols


def extract_patches(x: jax.Array, win: Window, pad_value=0) -> jax.Array:
    """Every window of `x`, gathered by slicing (im2col without the reshape).

    Args:
        x: (N, H, W, C).
        win: geometry from `resolve_window`.
        pad_value: value of the padding pixels (-inf for max pooling).

    Returns:
        (N, OH, OW, KH, KW, C) patches.
    """
    xp = jnp.pad(x, ((0, 0), *win.padding, (0, 0)), constant_values=pad_value)
    kh, kw = win.size
    rows = [jnp.stack([xp[tap_index(win, i, j)] for j in range(kw)], axis=3) for i in range(kh)]
    return jnp.stack(rows, axis=3)


def conv2d_naive(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1) -> jax.Array:
    """From-scratch twin of `conv2d`: patches times kernel, summed per output pixel.

    Same arguments, shapes and padding rules as `conv2d`; no `lax.conv*` inside.
    """
    win = conv_window(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    patches = extract_patches(x, win)
    n, oh, ow, kh, kw, c = patches.shape
    # Split channels into groups: group g's inputs only meet outputs g * O/G ... (g + 1) * O/G.
    patches = patches.reshape(n, oh, ow, kh, kw, groups, c // groups)
    wg = w.reshape(kh, kw, c // groups, groups, w.shape[3] // groups)
    y = jnp.einsum("npqijgc,ijcgo->npqgo", patches, wg)
    return _add_bias(y.reshape(n, oh, ow, w.shape[3]), b)
