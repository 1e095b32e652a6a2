"""Empirical receptive fields: which input pixels can move one output pixel.

The receptive field of an output pixel is the support of its gradient with respect to the
input. With positive weights and positive inputs nothing cancels, so the non-zero region of
that gradient is exactly the set of pixels the pixel depends on, and its extent can be set
against `shapes.receptive_field`.
"""

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.nn.ops.conv import conv2d
from cnnjax.nn.ops.pool import avg_pool, max_pool
from cnnjax.nn.ops.shapes import receptive_field

# (kind, kernel, stride, dilation), kind one of LAYER_KINDS; pools take dilation 1.
LayerSpec = tuple[str, int, int, int]
LAYER_KINDS = ("conv", "max", "avg")


def _make_layer(spec: LayerSpec, rng: np.random.Generator, channels: int, padding) -> Callable:
    kind, size, stride, dilation = spec
    if kind not in LAYER_KINDS or (kind != "conv" and dilation != 1):
        raise ValueError(f"bad layer {spec}: kind must be one of {LAYER_KINDS}, pools undilated")
    if kind == "conv":
        # Positive weights: no two paths can cancel, so every dependency shows in the gradient.
        w = jnp.asarray(rng.uniform(0.1, 1.0, (size, size, channels, channels)), jnp.float32)
        return partial(conv2d, w=w, stride=stride, padding=padding, dilation=dilation)
    pool = max_pool if kind == "max" else avg_pool
    return partial(pool, window=size, stride=stride, padding=padding)


def random_stack(
    layers: Sequence[LayerSpec], *, seed: int = 0, channels: int = 2, padding="SAME"
) -> Callable[[jax.Array], jax.Array]:
    """A function x -> y applying `layers` in order, convs with random positive weights.

    Args:
        layers: (kind, kernel, stride, dilation) per layer, input first.
        seed: seed of the conv weights (numpy: no PRNG kernels to compile for a one-off tool).
        channels: channels of the input and of every conv.
        padding: padding of every layer.

    Returns:
        fn mapping (N, H, W, channels) to (N, OH, OW, channels).
    """
    rng = np.random.default_rng(seed)
    fns = [_make_layer(spec, rng, channels, padding) for spec in layers]

    def apply(x: jax.Array) -> jax.Array:
        for fn in fns:
            x = fn(x)
        return x

    return apply


def stack_receptive_field(layers: Sequence[LayerSpec]) -> int:
    """`shapes.receptive_field` of a `random_stack` layer list."""
    return receptive_field([(k, s, d) for _, k, s, d in layers])


def centre_gradient_map(fn: Callable, input_shape: Sequence[int], *, seed: int = 0) -> np.ndarray:
    """|d(centre output pixel, summed over channels) / d input|, summed over batch and channels.

    Max pooling passes gradient to one winner per window, so a single input shows only part
    of the receptive field; the batch holds independent random inputs and the map is their
    union. Use an input large enough that the field is not clipped by the border.

    Args:
        fn: maps (N, H, W, C) to (N, OH, OW, C').
        input_shape: (N, H, W, C); N is the number of random inputs.
        seed: seed of the positive random inputs.

    Returns:
        (H, W) non-negative map.
    """
    x = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, input_shape), jnp.float32)
    out_shape = jax.eval_shape(fn, x).shape
    centre = np.zeros(out_shape, np.float32)
    centre[:, out_shape[1] // 2, out_shape[2] // 2, :] = 1.0

    def centre_output(x: jax.Array, mask: jax.Array) -> jax.Array:
        return (fn(x) * mask).sum()

    # The mask is an argument, not a constant: for a linear stack (convs, average pools) the
    # gradient would otherwise be a compile-time constant that XLA slowly folds.
    grad = jax.jit(jax.grad(centre_output))(x, centre)
    return np.abs(np.asarray(grad)).sum(axis=(0, 3))


def support_extent(grad_map: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of the non-zero entries of a 2-D map."""
    rows, cols = np.nonzero(grad_map)
    if rows.size == 0:
        raise ValueError("the gradient map is all zero: the output does not depend on the input")
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def empirical_receptive_field(
    fn: Callable, input_shape: Sequence[int], *, seed: int = 0
) -> tuple[int, int]:
    """(height, width) of the input region the centre output pixel of `fn` depends on."""
    return support_extent(centre_gradient_map(fn, input_shape, seed=seed))
