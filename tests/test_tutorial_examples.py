"""The tutorials' worked examples, each checked against the library."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.nn.ops import (
    avg_pool,
    conv2d,
    conv2d_backward,
    conv2d_naive,
    conv_params,
    dense_params,
    max_pool,
    output_size,
    pool_output_size,
    receptive_field,
)

IMAGE = [[1, 0, 1, 2, 1], [0, 1, 1, 0, 2], [1, 0, 0, 1, 1], [2, 1, 0, 1, 0], [1, 1, 2, 0, 1]]
KERNEL = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
# By hand: each output sums the four corners and the centre of its 3x3 window.
CONV_BY_HAND = [[4, 4, 3], [3, 3, 4], [5, 2, 5]]
POOL_INPUT = [[1, 3, 2, 1], [4, 2, 0, 1], [0, 1, 5, 2], [1, 2, 3, 0]]


def nhwc(a):
    return jnp.asarray(a, jnp.float32)[None, :, :, None]


def hwio(a):
    return jnp.asarray(a, jnp.float32)[:, :, None, None]


@pytest.mark.parametrize("fn", [conv2d, conv2d_naive])
def test_conv_5x5_image_3x3_kernel(fn):
    y = fn(nhwc(IMAGE), hwio(KERNEL))[0, :, :, 0]
    assert y[0, 0] == 4
    np.testing.assert_array_equal(y, CONV_BY_HAND)


def test_pooling_example():
    x = nhwc(POOL_INPUT)
    np.testing.assert_array_equal(max_pool(x, 2)[0, :, :, 0], [[4, 2], [2, 5]])
    np.testing.assert_allclose(avg_pool(x, 2)[0, :, :, 0], [[2.5, 1.0], [1.0, 2.5]])


def test_output_size_examples():
    assert output_size(5, 3, padding=0, stride=1) == 3
    assert output_size(5, 3, padding=1, stride=1) == 5
    assert output_size(7, 3, padding=0, stride=2) == 3


def small_cnn(x, w1, w2):
    """conv SAME 3x3 -> pool 2 -> conv SAME 3x3 -> pool 2 -> flatten."""
    x = max_pool(conv2d(x, w1, padding="SAME"), 2)
    x = max_pool(conv2d(x, w2, padding="SAME"), 2)
    return x.reshape(x.shape[0], -1)


def test_32_to_8_chain_flattens_to_2048():
    sizes = [32]
    for _ in range(2):  # conv SAME keeps the size, pool 2 halves it
        sizes.append(output_size(sizes[-1], 3, padding="SAME"))
        sizes.append(pool_output_size(sizes[-1], 2))
    assert sizes == [32, 32, 16, 16, 8]
    assert sizes[-1] * sizes[-1] * 32 == 2048
    args = (
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
        jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.float32),
        jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32),
    )
    assert jax.eval_shape(small_cnn, *args).shape == (1, 2048)


def test_conv_parameter_counts():
    assert conv_params(3, 3, 3, 16) == 448
    assert conv_params(3, 3, 3, 64) == 1792


def test_three_stacked_3x3_convs_see_7x7_with_fewer_weights():
    assert receptive_field([(3, 1)] * 3) == 7
    # Weights per input/output channel pair: three 3x3 kernels vs one 7x7 kernel.
    assert 3 * conv_params(3, 3, 1, 1, bias=False) == 27
    assert conv_params(7, 7, 1, 1, bias=False) == 49


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_keras_pool_sizes_match_eval_shape(padding):
    for n in range(3, 12):
        for p in (2, 3):
            for s in (1, 2, 3):
                expected = (n - p) // s + 1 if padding == "valid" else (n - 1) // s + 1
                assert pool_output_size(n, p, s, padding) == expected
                x = jax.ShapeDtypeStruct((1, n, n, 1), jnp.float32)
                shape = jax.eval_shape(partial(max_pool, window=p, stride=s, padding=padding), x)
                assert shape.shape == (1, expected, expected, 1)


def test_dense_on_a_flattened_224x224x3_image():
    assert dense_params(224 * 224 * 3, 1000, bias=False) == 150_528_000


def test_centre_pixel_under_all_four_windows_collects_all_of_them():
    # 2x2 kernel on a 3x3 input: 2x2 outputs, and the centre pixel lies under every window,
    # meeting kernel weight w[1 - p, 1 - q] in window (p, q).
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    w = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    dy = jnp.array([[0.5, -1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
    by_formula = sum(w[1 - p, 1 - q, 0, 0] * dy[0, p, q, 0] for p in range(2) for q in range(2))
    assert float(by_formula) == 4 * 0.5 + 3 * -1.0 + 2 * 2.0 + 1 * 3.0
    dx, _, _ = conv2d_backward(x, w, dy)
    dx_vjp, _ = jax.vjp(conv2d, x, w)[1](dy)
    np.testing.assert_allclose(dx[0, 1, 1, 0], by_formula)
    np.testing.assert_allclose(dx_vjp[0, 1, 1, 0], by_formula)
