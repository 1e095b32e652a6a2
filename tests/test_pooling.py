"""nn.pooling.max_pool: equal to nn.max_pool, values and gradients, fast path and fallback."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.nn.pooling import _is_tiled, max_pool


def _weighted_sum(pool):
    """A loss whose gradient differs per output element, so a misrouted gradient shows."""

    def loss(x):
        y = pool(x)
        return jnp.sum(y * jnp.arange(1, y.size + 1, dtype=y.dtype).reshape(y.shape))

    return loss


def _value_and_grad(pool):
    """One jitted program for value and gradient (eager op-by-op dispatch is what costs here)."""
    return jax.jit(lambda x: (pool(x), jax.grad(_weighted_sum(pool))(x)))


def _both(x, window, strides=None, padding="VALID"):
    ours = lambda x: max_pool(x, window, strides, padding)
    ref = lambda x: nn.max_pool(x, window, strides or window, padding)
    return ours, ref


CASES = [
    ((2, 8, 8, 3), (2, 2), None, "VALID"),
    ((2, 7, 9, 3), (2, 2), None, "VALID"),  # odd sizes: remainder cropped, zero gradient
    ((1, 9, 6, 2), (3, 3), None, "VALID"),
    ((1, 6, 8, 2), (2, 4), None, "VALID"),
    ((2, 8, 8, 3), (2, 2), None, "SAME"),  # divisible: same as VALID
    ((2, 8, 8, 3), (2, 2), None, ((0, 0), (0, 0))),
    ((2, 7, 7, 3), (2, 2), None, "SAME"),  # fallback: SAME pads
    ((2, 8, 8, 3), (3, 3), (2, 2), "VALID"),  # fallback: overlapping windows
    ((2, 8, 8, 3), (3, 3), (1, 1), "SAME"),  # fallback
    ((8, 8, 3), (2, 2), None, "VALID"),  # unbatched
    ((2, 3, 8, 8, 3), (2, 2), None, "VALID"),  # extra leading dims
]


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_value_and_grad_equal_nn_max_pool(shape, window, strides, padding):
    x = jax.random.normal(jax.random.key(0), shape)
    ties = jnp.clip(jnp.round(x), -1, 1)  # values in {-1, 0, 1}: most windows hold ties
    ours, ref = (_value_and_grad(p) for p in _both(x, window, strides, padding))
    for xi in (x, ties):
        (y, g), (y_ref, g_ref) = ours(xi), ref(xi)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(g, g_ref)


def test_tie_goes_to_first_max_in_row_major_order():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(1.0).at[0, 1, 1, 0].set(1.0)
    for pool in _both(x, (2, 2)):
        g = jax.grad(lambda x, pool=pool: pool(x).sum())(x)
        np.testing.assert_array_equal(g.ravel(), [0, 0, 1, 0])
    g = jax.grad(lambda x: max_pool(x).sum())(jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_array_equal(g.ravel(), [1, 0, 0, 0])


def test_fast_path_taken_only_for_tilings():
    assert _is_tiled((1, 8, 8, 1), (2, 2), (2, 2), "VALID")
    assert _is_tiled((1, 7, 8, 1), (2, 2), (2, 2), "VALID")
    assert _is_tiled((1, 8, 8, 1), (2, 2), (2, 2), "SAME")
    assert not _is_tiled((1, 7, 8, 1), (2, 2), (2, 2), "SAME")
    assert not _is_tiled((1, 8, 8, 1), (3, 3), (2, 2), "VALID")
    assert not _is_tiled((1, 8, 8, 1), (2, 2), (2, 2), ((1, 0), (0, 0)))


def test_backward_has_no_scatter():
    x = jnp.ones((2, 8, 8, 3))
    hlo = jax.jit(jax.grad(lambda x: max_pool(x).sum())).lower(x).as_text()
    assert "select_and_scatter" not in hlo and "scatter" not in hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved(dtype):
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4)).astype(dtype)
    y, g = _value_and_grad(max_pool)(x)
    y_ref, g_ref = _value_and_grad(lambda x: nn.max_pool(x, (2, 2), (2, 2)))(x)
    assert y.dtype == g.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(g, g_ref)


def test_jit_vmap_grad_compose():
    x = jax.random.normal(jax.random.key(2), (3, 2, 6, 6, 4))
    loss = _weighted_sum(max_pool)
    per_example = jax.jit(jax.vmap(jax.grad(loss)))(x)
    ref = _weighted_sum(lambda x: nn.max_pool(x, (2, 2), (2, 2)))
    np.testing.assert_array_equal(per_example, jax.jit(jax.vmap(jax.grad(ref)))(x))


def test_second_order_matches():
    x = jax.random.normal(jax.random.key(3), (1, 4, 4, 2))
    ours, ref = _both(x, (2, 2))
    hvp = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x) ** 3))(x)))
    np.testing.assert_allclose(jax.jit(hvp(ours))(x), jax.jit(hvp(ref))(x), rtol=1e-6)


def test_window_larger_than_input_raises():
    with pytest.raises(ValueError, match="larger than the input"):
        max_pool(jnp.ones((1, 1, 4, 1)), (2, 2))
