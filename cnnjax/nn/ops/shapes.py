"""Shape and size formulas for convolutions and pooling.

Everything here is plain Python on ints, so the formulas can be read, tested and used to
size models without tracing anything. `resolve_window` is the one place that turns the
user-facing `stride` / `padding` / `dilation` arguments into explicit pairs; the conv, pool
and gradient ops all call it, so the SAME-padding convention is written once.
"""

from collections.abc import Sequence
from numbers import Integral
from typing import NamedTuple

Pair = tuple[int, int]
PaddingLike = str | int | tuple[Pair, Pair]


class Window(NamedTuple):
    """A 2-D sliding window resolved against a concrete input size.

    Attributes:
        size: (kh, kw) kernel/window size before dilation.
        stride: (sh, sw).
        dilation: (dh, dw).
        padding: ((top, bottom), (left, right)), all >= 0.
        out: (out_h, out_w) number of window positions.
    """

    size: Pair
    stride: Pair
    dilation: Pair
    padding: tuple[Pair, Pair]
    out: Pair


def as_pair(value: int | Sequence[int], name: str) -> Pair:
    """Returns `value` as an (h, w) pair of positive ints; an int is used for both."""
    pair = (value, value) if isinstance(value, Integral) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, Integral) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def effective_kernel_size(k: int, dilation: int = 1) -> int:
    """Span of a dilated kernel: d(k - 1) + 1."""
    return dilation * (k - 1) + 1


def _same_padding(n: int, eff_k: int, stride: int) -> Pair:
    # XLA/TF convention: out = ceil(n / s), the odd pixel of padding goes at the end.
    total = max((-(-n // stride) - 1) * stride + eff_k - n, 0)
    return total // 2, total - total // 2


def _padding_1d(padding, n: int, eff_k: int, stride: int) -> Pair:
    """(lo, hi) padding of one spatial axis; `padding` is a string, an int or a pair."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return _same_padding(n, eff_k, stride)
        if mode == "VALID":
            return 0, 0
        raise ValueError(f"unknown padding {padding!r}: use 'SAME', 'VALID', an int or pairs")
    lo, hi = (padding, padding) if isinstance(padding, Integral) else tuple(padding)
    if lo < 0 or hi < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return int(lo), int(hi)


def _split_padding(padding: PaddingLike) -> tuple:
    """Per-axis padding specs (h, w) from a 2-D padding argument."""
    if isinstance(padding, str | Integral):
        return padding, padding
    if len(padding) != 2 or not all(isinstance(p, Sequence) and len(p) == 2 for p in padding):
        raise ValueError(f"explicit padding must be ((top, bottom), (left, right)), got {padding}")
    return tuple(padding)


def _positions(n: int, pads: Pair, eff_k: int, stride: int) -> int:
    out = (n + pads[0] + pads[1] - eff_k) // stride + 1
    if out < 1:
        raise ValueError(
            f"window of span {eff_k} does not fit an input of size {n} with padding {pads}"
        )
    return out


def resolve_window(
    in_hw: Sequence[int],
    size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = "VALID",
    dilation: int | Sequence[int] = 1,
) -> Window:
    """Normalises window arguments to explicit pairs for an input of spatial size `in_hw`.

    Args:
        in_hw: (H, W) of the input.
        size: window/kernel size, int or pair.
        stride: int or pair.
        padding: "SAME" / "VALID" (any case), an int for every side, or
            ((top, bottom), (left, right)).
        dilation: int or pair.

    Returns:
        A `Window` with explicit pairs and the output size.

    Raises:
        ValueError: on malformed arguments or a window that does not fit the input.
    """
    size, stride = as_pair(size, "window size"), as_pair(stride, "stride")
    dilation = as_pair(dilation, "dilation")
    eff = tuple(map(effective_kernel_size, size, dilation))
    pads = tuple(map(_padding_1d, _split_padding(padding), in_hw, eff, stride))
    out = tuple(map(_positions, in_hw, pads, eff, stride))
    return Window(size, stride, dilation, pads, out)


def output_size(
    n: int, k: int, *, padding: str | int | Pair, stride: int = 1, dilation: int = 1
) -> int:
    """Number of output positions along one axis of a convolution or pooling.

    SAME gives ceil(n / s); VALID gives floor((n - k_eff) / s) + 1; an int p pads both
    sides: floor((n + 2p - k_eff) / s) + 1, with k_eff = d(k - 1) + 1.

    Raises:
        ValueError: if the window does not fit (the result would be < 1).
    """
    eff = effective_kernel_size(k, dilation)
    return _positions(n, _padding_1d(padding, n, eff, stride), eff, stride)


def pool_output_size(n: int, pool: int, stride: int | None = None, padding: str = "valid") -> int:
    """Keras pooling size: floor((n - p) / s) + 1 for "valid", floor((n - 1) / s) + 1 for "same".

    `stride` defaults to the pool size, as in Keras.
    """
    return output_size(n, pool, padding=padding, stride=pool if stride is None else stride)


def receptive_field(layers: Sequence[Sequence[int]]) -> int:
    """Receptive field (along one axis) of a stack of conv/pool layers.

    Uses r_l = r_{l-1} + (k_l - 1) d_l prod_{i<l} s_i with r_0 = 1.

    Args:
        layers: (kernel, stride) or (kernel, stride, dilation) per layer, input first.
    """
    rf, jump = 1, 1
    for layer in layers:
        k, s, d = (*layer, 1) if len(layer) == 2 else layer
        rf += (k - 1) * d * jump
        jump *= s
    return rf


def conv_params(kh: int, kw: int, c_in: int, c_out: int, bias: bool = True) -> int:
    """Parameters of a conv layer: kh * kw * c_in * c_out weights (+ c_out biases)."""
    return kh * kw * c_in * c_out + (c_out if bias else 0)


def dense_params(n_in: int, n_out: int, bias: bool = True) -> int:
    """Parameters of a dense layer: n_in * n_out weights (+ n_out biases)."""
    return conv_params(1, 1, n_in, n_out, bias)
