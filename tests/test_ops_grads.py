"""Analytic backward passes vs jax.vjp of the forward ops, tie rules and unread pixels."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import balanced_cases

from cnnjax.nn.ops import (
    avg_pool,
    avg_pool_backward,
    conv2d,
    conv2d_backward,
    max_pool,
    max_pool_backward,
)
from cnnjax.nn.ops.shapes import effective_kernel_size

CONV_STATIC = ("stride", "padding", "dilation", "groups")
POOL_STATIC = ("window", "stride", "padding")
TOL = dict(rtol=1e-5, atol=1e-5)


@partial(jax.jit, static_argnames=CONV_STATIC)
def conv_vjp(x, w, b, dy, *, stride, padding, dilation, groups):
    f = partial(conv2d, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return jax.vjp(f, x, w, b)[1](dy)


@partial(jax.jit, static_argnames=("op", *POOL_STATIC))
def pool_vjp(x, dy, *, op, window, stride, padding):
    return jax.vjp(partial(op, window=window, stride=stride, padding=padding), x)[1](dy)[0]


conv_backward_jit = jax.jit(conv2d_backward, static_argnames=CONV_STATIC)
max_backward_jit = jax.jit(max_pool_backward, static_argnames=POOL_STATIC)
avg_backward_jit = jax.jit(avg_pool_backward, static_argnames=POOL_STATIC)


def check_conv_backward(rng, batch, hw, kernel_hw, c, o, **kw):
    x = jnp.asarray(rng.standard_normal((batch, *hw, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel_hw, c // kw["groups"], o)), jnp.float32)
    b = jnp.zeros((o,), jnp.float32)
    dy_shape = jax.eval_shape(partial(conv2d, **kw), x, w).shape
    dy = jnp.asarray(rng.standard_normal(dy_shape), jnp.float32)
    for got, want in zip(
        conv_backward_jit(x, w, dy, **kw), conv_vjp(x, w, b, dy, **kw), strict=True
    ):
        np.testing.assert_allclose(got, want, **TOL)


# groups -> (C, O); "depthwise" is groups == C with a channel multiplier of 2.
CHANNELS = {1: (3, 4), 2: (4, 6), "depthwise": (3, 6)}
CONV_FACTORS = (
    (1, 2, 3, 5),
    (1, 2, 3),
    ("VALID", "SAME", 1, ((2, 0), (1, 3))),
    (1, 2),
    tuple(CHANNELS),
)


# Kernel sizes x strides x paddings x dilations x groups, sampled so every value appears.
CONV_CASES = balanced_cases(CONV_FACTORS, 12, seed=1)


@pytest.mark.parametrize("k,stride,padding,dilation,group_key", CONV_CASES)
def test_conv2d_backward_matches_vjp(k, stride, padding, dilation, group_key):
    rng = np.random.default_rng(k * 10 + stride)
    c, o = CHANNELS[group_key]
    groups = c if group_key == "depthwise" else group_key
    # Rectangular inputs (H < W) whose size minus the kernel span is often not a stride multiple.
    eff = effective_kernel_size(k, dilation)
    h = eff + int(rng.integers(0, 5))
    hw = (h, h + int(rng.integers(1, 4)))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_conv_backward(rng, 2, hw, (k, k), c, o, **kw)


def random_padding(rng):
    choice = rng.integers(0, 4)
    if choice < 2:
        return ("valid", "SAME")[choice]
    if choice == 2:
        return int(rng.integers(0, 3))
    return tuple(tuple(int(p) for p in rng.integers(0, 4, size=2)) for _ in range(2))


def test_conv2d_backward_randomized_configs():
    rng = np.random.default_rng(2024)
    for _ in range(5):
        kernel = tuple(int(k) for k in rng.integers(1, 5, size=2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, size=2))
        stride = tuple(int(s) for s in rng.integers(1, 4, size=2))
        groups = int(rng.choice([1, 2, 4]))
        c, o = 4, groups * int(rng.integers(1, 3))
        eff = [effective_kernel_size(k, d) for k, d in zip(kernel, dilation, strict=True)]
        hw = tuple(e + int(rng.integers(0, 6)) for e in eff)
        kw = dict(stride=stride, padding=random_padding(rng), dilation=dilation, groups=groups)
        check_conv_backward(rng, int(rng.integers(1, 4)), hw, kernel, c, o, **kw)


def test_conv2d_backward_large_padding_and_unread_rows():
    # Padding wider than the kernel span makes the input-gradient pads negative (cropping).
    rng = np.random.default_rng(3)
    pads = ((3, 4), (2, 0))
    check_conv_backward(rng, 1, (4, 5), (2, 2), 2, 3, stride=1, padding=pads, dilation=1, groups=1)
    # n=6, k=3, s=2, VALID: windows read rows 0..4; row 5 is never read.
    x, w = jnp.ones((1, 6, 6, 1)), jnp.ones((3, 3, 1, 1))
    dx, _, _ = conv_backward_jit(x, w, jnp.ones((1, 2, 2, 1)), stride=2)
    assert np.all(dx[:, 5, :] == 0) and np.all(dx[:, :, 5] == 0)
    assert np.all(dx[:, :5, :5] > 0)


def test_conv2d_bias_gradient_is_dy_summed_over_n_h_w():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 5, 5, 2)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    _, _, db = conv_backward_jit(x, jnp.zeros((3, 3, 2, 4)), dy)
    np.testing.assert_allclose(db, np.asarray(dy).sum(axis=(0, 1, 2)), **TOL)


def test_conv2d_backward_rejects_wrong_dy_shape():
    with pytest.raises(ValueError, match="dy must have the forward output's shape"):
        conv2d_backward(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), jnp.zeros((1, 5, 5, 4)))


# Windows x strides x paddings; windows >= 2 keep padding below the window size (as Keras
# does), so no window lies wholly in padding.
POOL_FACTORS = ((2, 3, (2, 3), (3, 2)), (None, 1, 2, 3), ("VALID", "SAME", 1, ((1, 0), (0, 1))))
POOL_CASES = balanced_cases(POOL_FACTORS, 8, seed=2)


@pytest.mark.parametrize("window,stride,padding", POOL_CASES)
@pytest.mark.parametrize(
    "op,backward", [(max_pool, max_backward_jit), (avg_pool, avg_backward_jit)], ids=["max", "avg"]
)
def test_pool_backward_matches_vjp(op, backward, window, stride, padding):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
    kw = dict(window=window, stride=stride, padding=padding)
    dy_shape = jax.eval_shape(partial(op, **kw), x).shape
    dy = jnp.asarray(rng.standard_normal(dy_shape), jnp.float32)
    np.testing.assert_allclose(backward(x, dy, **kw), pool_vjp(x, dy, op=op, **kw), **TOL)


def test_max_pool_ties_go_to_first_in_row_major_order():
    # One window, a three-way tie at (0, 1), (1, 0), (1, 1): the first in row-major order wins.
    x = jnp.array([[0.0, 5.0], [5.0, 5.0]]).reshape(1, 2, 2, 1)
    dy = jnp.full((1, 1, 1, 1), 3.0)
    expected = np.array([[0.0, 3.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(max_backward_jit(x, dy, 2), expected)
    np.testing.assert_array_equal(
        pool_vjp(x, dy, op=max_pool, window=2, stride=None, padding="VALID"), expected
    )


def test_max_pool_ties_in_overlapping_windows_accumulate():
    # Constant 3x3 input, 2x2 windows, stride 1: every window is a 4-way tie, so each of the
    # four windows sends its gradient to its own top-left pixel.
    x = jnp.ones((1, 3, 3, 1))
    dy = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    expected = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]).reshape(1, 3, 3, 1)
    kw = dict(window=2, stride=1, padding="VALID")
    np.testing.assert_array_equal(max_backward_jit(x, dy, **kw), expected)
    np.testing.assert_array_equal(pool_vjp(x, dy, op=max_pool, **kw), expected)
    # A single winner under overlapping windows collects all of their gradients.
    x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
    np.testing.assert_array_equal(max_backward_jit(x, dy, **kw)[0, 1, 1, 0], 10.0)


def test_max_pool_padding_never_wins():
    x = -jnp.ones((1, 3, 3, 1))  # all negative, padding is -inf
    dy = jnp.ones((1, 2, 2, 1))
    dx = max_backward_jit(x, dy, 2, padding="SAME")
    assert float(dx.sum()) == 4.0
    np.testing.assert_array_equal(
        dx, pool_vjp(x, dy, op=max_pool, window=2, stride=None, padding="SAME")
    )


def test_avg_pool_backward_spreads_over_valid_pixels_only():
    # 3x3 input, 2x2 windows, stride 2, SAME: the windows hold 4, 2, 2 and 1 real pixels.
    dy = jnp.ones((1, 2, 2, 1))
    dx = avg_backward_jit(jnp.zeros((1, 3, 3, 1)), dy, 2, padding="SAME")
    expected = np.array([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5], [0.5, 0.5, 1.0]])
    np.testing.assert_allclose(dx[0, :, :, 0], expected, **TOL)


@pytest.mark.parametrize("backward", [max_pool_backward, avg_pool_backward])
def test_pool_backward_rejects_wrong_dy_shape(backward):
    with pytest.raises(ValueError, match="dy must have the forward output's shape"):
        backward(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 3, 3, 2)), 2)
