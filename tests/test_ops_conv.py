"""conv2d (lax) vs conv2d_naive (from scratch), padding conventions and argument errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import balanced_cases
from jax import lax
from jax.test_util import check_grads

from cnnjax.nn.ops import conv2d, conv2d_naive
from cnnjax.nn.ops.shapes import effective_kernel_size, resolve_window

STATIC = ("stride", "padding", "dilation", "groups")
conv_jit = jax.jit(conv2d, static_argnames=STATIC)
naive_jit = jax.jit(conv2d_naive, static_argnames=STATIC)

# groups -> (C, O); "depthwise" is groups == C with a channel multiplier of 2.
CHANNELS = {1: (3, 4), 2: (4, 6), "depthwise": (3, 6)}
PADDINGS = ("VALID", "SAME", 1, ((2, 0), (1, 3)))
FACTORS = ((1, 2, 3, 5), (1, 2, 3), PADDINGS, (1, 2), tuple(CHANNELS))


# Kernel sizes x strides x paddings x dilations x groups, sampled so every value appears.
CASES = balanced_cases(FACTORS, 16, seed=0)


def make_operands(k, dilation, group_key, seed, dtype=jnp.float32):
    """Random x (2, H, W, C) with H < W (odd or even) fitting the dilated kernel, and w."""
    rng = np.random.default_rng(seed)
    c, o = CHANNELS[group_key]
    groups = c if group_key == "depthwise" else group_key
    eff = effective_kernel_size(k, dilation)
    h = eff + int(rng.integers(0, 5))
    w = h + int(rng.integers(1, 4))
    x = rng.standard_normal((2, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((k, k, c // groups, o)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype), groups


@pytest.mark.parametrize("k,stride,padding,dilation,group_key", CASES)
def test_naive_matches_lax_float32(k, stride, padding, dilation, group_key):
    x, w, groups = make_operands(k, dilation, group_key, seed=k * 100 + stride)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    np.testing.assert_allclose(naive_jit(x, w, **kw), conv_jit(x, w, **kw), rtol=1e-5, atol=1e-5)


# Unit roundoff: half the spacing of the significand (8 bits for bfloat16, 11 for float16).
UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_naive_matches_lax_low_precision(dtype):
    """Each output sums K = 3 * 3 * 1 products (depthwise: one input channel per group). Even
    accumulated in ``dtype``, K product roundings and K - 1 addition roundings put it within
    (K + 1) u * sum |x w| of the exact sum (the first-order bound gamma_K of Higham 3.1, with one
    u to spare); the float32 reference of the same values is exact to 2^-24 relative."""
    # Depthwise, dilated, strided, SAME: the einsum path with every option switched on.
    x, w, groups = make_operands(3, 2, "depthwise", seed=7, dtype=dtype)
    kw = dict(stride=2, padding="SAME", dilation=2, groups=groups)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    ref = np.asarray(conv_jit(x32, w32, **kw))
    bound = (9 + 1) * UNIT_ROUNDOFF[dtype] * np.asarray(conv_jit(abs(x32), abs(w32), **kw))
    for fn in (naive_jit, conv_jit):
        y = fn(x, w, **kw)
        assert y.dtype == dtype
        err = np.abs(np.asarray(y, np.float32) - ref)
        assert np.all(err <= bound), np.max(err / bound)


def test_bias_is_added_per_output_channel():
    x, w, _ = make_operands(3, 1, 1, seed=1)
    b = jnp.arange(4.0)
    for fn in (conv_jit, naive_jit):
        y = fn(x, w)
        np.testing.assert_allclose(fn(x, w, b) - y, jnp.broadcast_to(b, y.shape), atol=1e-5)


@pytest.mark.parametrize(
    "n,k,stride,dilation,expected",
    [(4, 2, 1, 1, (0, 1)), (5, 3, 2, 1, (1, 1)), (6, 3, 2, 2, (1, 2)), (7, 3, 3, 1, (1, 1))],
)
def test_same_padding_puts_extra_pixel_at_bottom_right(n, k, stride, dilation, expected):
    win = resolve_window((n, n), k, stride=stride, padding="same", dilation=dilation)
    assert win.padding == (expected, expected)
    assert win.out == (-(-n // stride),) * 2


@pytest.mark.parametrize("k,stride,dilation", [(2, 1, 1), (3, 2, 2), (4, 3, 1), (5, 2, 2)])
def test_same_matches_xla_same(k, stride, dilation):
    x, w, _ = make_operands(k, dilation, 1, seed=3)
    ref = lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        "SAME",
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    for fn in (conv_jit, naive_jit):
        y = fn(x, w, stride=stride, padding="SAME", dilation=dilation)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_int_padding_equals_explicit_pairs():
    x, w, _ = make_operands(3, 1, 1, seed=4)
    np.testing.assert_allclose(conv2d(x, w, padding=2), conv2d(x, w, padding=((2, 2), (2, 2))))


def test_rectangular_stride_and_dilation_pairs():
    x, w, _ = make_operands(3, 2, 1, seed=5)
    kw = dict(stride=(1, 2), dilation=(2, 1), padding="SAME")
    y = conv_jit(x, w, **kw)
    assert y.shape == (2, x.shape[1], -(-x.shape[2] // 2), 4)
    np.testing.assert_allclose(naive_jit(x, w, **kw), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [conv2d, conv2d_naive])
def test_check_grads(fn):
    x, w, groups = make_operands(3, 1, 2, seed=6)
    f = jax.jit(partial(fn, stride=2, padding="SAME", groups=groups))
    check_grads(f, (x, w), order=1, modes=["rev"])


@pytest.mark.parametrize("fn", [conv2d, conv2d_naive])
@pytest.mark.parametrize(
    "x_shape,w_shape,kwargs,match",
    [
        ((5, 5, 3), (3, 3, 3, 4), {}, "x \\(N, H, W, C\\)"),
        ((1, 5, 5, 3), (3, 3, 2, 4), {}, "channel mismatch: x C=3 != w I=2 \\* groups=1"),
        ((1, 5, 5, 3), (3, 3, 1, 4), {"groups": 2}, "divisible by groups=2"),
        ((1, 5, 5, 3), (3, 3, 3, 4), {"padding": "FULL"}, "unknown padding 'FULL'"),
        ((1, 5, 5, 3), (7, 7, 3, 4), {}, "does not fit"),
        ((1, 5, 5, 3), (3, 3, 3, 4), {"stride": 0}, "stride must be a positive int"),
    ],
)
def test_bad_arguments_raise_clear_errors(fn, x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(jnp.zeros(x_shape), jnp.zeros(w_shape), **kwargs)


def test_bad_bias_shape_raises():
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        conv2d(jnp.zeros((1, 5, 5, 3)), jnp.zeros((3, 3, 3, 4)), jnp.zeros(3))
