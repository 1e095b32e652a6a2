"""Pooling: reduce_window ops vs from-scratch twins, Keras border semantics, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import balanced_cases
from jax import lax
from jax.test_util import check_grads

from cnnjax.nn.ops import (
    avg_pool,
    avg_pool_naive,
    global_avg_pool,
    global_avg_pool_naive,
    max_pool,
    max_pool_naive,
)

STATIC = ("window", "stride", "padding")
PAIRS = {
    "max": (
        jax.jit(max_pool, static_argnames=STATIC),
        jax.jit(max_pool_naive, static_argnames=STATIC),
    ),
    "avg": (
        jax.jit(avg_pool, static_argnames=STATIC),
        jax.jit(avg_pool_naive, static_argnames=STATIC),
    ),
}
# Windows x strides x paddings; windows >= 2 keep padding below the window size (as Keras
# does), so no window lies wholly in padding.
FACTORS = ((2, 3, (2, 3), (3, 2)), (None, 1, 2, 3), ("VALID", "same", 1, ((1, 0), (0, 1))))


CASES = balanced_cases(FACTORS, 12, seed=0)


def random_input(shape=(2, 7, 6, 3), dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("window,stride,padding", CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_naive_matches_reduce_window(kind, window, stride, padding):
    fast, naive = PAIRS[kind]
    x, kw = random_input(), dict(window=window, stride=stride, padding=padding)
    np.testing.assert_allclose(naive(x, **kw), fast(x, **kw), rtol=1e-5, atol=1e-5)


# Unit roundoff: half the spacing of the significand (8 bits for bfloat16, 11 for float16).
UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_low_precision_matches_float32(kind, dtype):
    """The max of low-precision values is one of them: exactly the float32 result. The mean of
    a 3x3 window rounds at most 8 additions and one division, each off by at most u relative,
    so it is within 9 u * mean(|x|) of the float32 mean of the same values."""
    fast, naive = PAIRS[kind]
    x, kw = random_input(dtype=dtype), dict(window=3, stride=2, padding="SAME")
    x32 = x.astype(jnp.float32)  # exact: every low-precision value is a float32
    ref = np.asarray(fast(x32, **kw))
    bound = 9 * UNIT_ROUNDOFF[dtype] * np.asarray(PAIRS["avg"][0](jnp.abs(x32), **kw))
    for fn in (fast, naive):
        y = fn(x, **kw)
        assert y.dtype == dtype
        y = np.asarray(y, np.float32)
        if kind == "max":
            np.testing.assert_array_equal(y, ref)
        else:
            assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) / bound)


def test_max_pool_same_matches_xla_same():
    x = random_input()
    ref = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 2, 1), (1, 2, 2, 1), "SAME")
    for fn in PAIRS["max"]:
        np.testing.assert_array_equal(fn(x, window=(3, 2), stride=2, padding="SAME"), ref)


def test_avg_pool_same_excludes_padding_from_the_count():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    # Windows at stride 2 cover {0,1,3,4}, {2,5}, {6,7} and {8}: averages of real pixels only.
    expected = np.array([[2.0, 3.5], [6.5, 8.0]])
    for fn in PAIRS["avg"]:
        np.testing.assert_allclose(fn(x, window=2, stride=2, padding="SAME")[0, :, :, 0], expected)
    ones = jnp.ones((1, 5, 4, 2))
    np.testing.assert_allclose(avg_pool(ones, 3, 1, "SAME"), jnp.ones((1, 5, 4, 2)))


def test_max_pool_padding_never_wins():
    x = -jnp.ones((1, 3, 3, 1))
    for fn in PAIRS["max"]:
        np.testing.assert_array_equal(
            fn(x, window=2, stride=None, padding="SAME"), -np.ones((1, 2, 2, 1))
        )


def test_stride_defaults_to_window():
    x = random_input((1, 8, 6, 2))
    assert max_pool(x, 2).shape == (1, 4, 3, 2)
    np.testing.assert_allclose(avg_pool(x, (2, 3)), avg_pool(x, (2, 3), (2, 3)))


@pytest.mark.parametrize("fn", [global_avg_pool, global_avg_pool_naive])
def test_global_avg_pool_is_the_spatial_mean(fn):
    x = random_input((2, 5, 3, 4))
    y = fn(x)
    assert y.shape == (2, 4)
    np.testing.assert_allclose(y, np.asarray(x).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [max_pool_naive, avg_pool_naive])
def test_check_grads_naive(fn):
    f = jax.jit(partial(fn, window=2, stride=1, padding="SAME"))
    check_grads(f, (random_input((1, 5, 4, 2)),), order=1, modes=["rev"])


def test_check_grads_global_avg_pool_naive():
    check_grads(global_avg_pool_naive, (random_input((1, 3, 4, 2)),), order=1, modes=["rev"])


@pytest.mark.parametrize("fn", [max_pool, avg_pool, max_pool_naive, avg_pool_naive])
@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((4, 4, 3), {}, "x must be \\(N, H, W, C\\)"),
        ((1, 4, 4, 3), {"padding": "full"}, "unknown padding 'full'"),
        ((1, 1, 4, 3), {}, "does not fit"),
        ((1, 4, 4, 3), {"stride": (1, 2, 3)}, "stride must be a positive int or a pair"),
    ],
)
def test_bad_arguments_raise_clear_errors(fn, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(jnp.zeros(shape), 2, **kwargs)


@pytest.mark.parametrize("fn", [global_avg_pool, global_avg_pool_naive])
def test_global_avg_pool_rejects_wrong_rank(fn):
    with pytest.raises(ValueError, match="x must be \\(N, H, W, C\\)"):
        fn(jnp.zeros((4, 4, 3)))
