"""From-scratch convolution and pooling maths: forward ops, analytic gradients, shape formulas."""

from cnnjax.nn.ops.conv import conv2d, conv2d_naive
from cnnjax.nn.ops.grads import avg_pool_backward, conv2d_backward, max_pool_backward
from cnnjax.nn.ops.pool import (
    avg_pool,
    avg_pool_naive,
    global_avg_pool,
    global_avg_pool_naive,
    max_pool,
    max_pool_naive,
)
from cnnjax.nn.ops.receptive import centre_gradient_map, empirical_receptive_field
from cnnjax.nn.ops.shapes import (
    conv_params,
    dense_params,
    output_size,
    pool_output_size,
    receptive_field,
)

__all__ = [
    "avg_pool",
    "avg_pool_backward",
    "avg_pool_naive",
    "centre_gradient_map",
    "conv2d",
    "conv2d_backward",
    "conv2d_naive",
    "conv_params",
    "dense_params",
    "empirical_receptive_field",
    "global_avg_pool",
    "global_avg_pool_naive",
    "max_pool",
    "max_pool_backward",
    "max_pool_naive",
    "output_size",
    "pool_output_size",
    "receptive_field",
]
