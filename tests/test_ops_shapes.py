"""Shape formulas: output sizes, window resolution, receptive fields and parameter counts."""

import numpy as np
import pytest

from cnnjax.nn.ops import (
    conv_params,
    dense_params,
    empirical_receptive_field,
    output_size,
    pool_output_size,
    receptive_field,
)
from cnnjax.nn.ops.receptive import random_stack, stack_receptive_field, support_extent
from cnnjax.nn.ops.shapes import resolve_window


@pytest.mark.parametrize(
    "n,k,padding,stride,dilation,expected",
    [
        (5, 3, 0, 1, 1, 3),
        (5, 3, 1, 1, 1, 5),
        (7, 3, 0, 2, 1, 3),
        (7, 3, "VALID", 2, 1, 3),
        (7, 3, "same", 2, 1, 4),
        (10, 3, "SAME", 3, 2, 4),
        (10, 3, "VALID", 1, 2, 6),  # k_eff = 5
        (10, 3, 2, 3, 2, 4),  # floor((10 + 4 - 5) / 3) + 1
        (1, 1, "VALID", 1, 1, 1),
    ],
)
def test_output_size(n, k, padding, stride, dilation, expected):
    assert output_size(n, k, padding=padding, stride=stride, dilation=dilation) == expected


def test_output_size_same_is_ceil_n_over_s():
    for n in range(1, 20):
        for s in (1, 2, 3, 4):
            assert output_size(n, 3, padding="SAME", stride=s) == -(-n // s)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=2, k=3, padding="VALID"), "does not fit"),
        (dict(n=4, k=3, padding="VALID", dilation=2), "does not fit"),
        (dict(n=4, k=3, padding="full"), "unknown padding 'full'"),
        (dict(n=4, k=3, padding=-1), "non-negative"),
    ],
)
def test_output_size_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        output_size(**kwargs)


def test_resolve_window_normalises_everything_to_pairs():
    win = resolve_window((7, 6), (3, 2), stride=(2, 1), padding="same", dilation=(1, 2))
    assert win.size == (3, 2) and win.stride == (2, 1) and win.dilation == (1, 2)
    # H: ceil(7/2)=4, total pad 2; W: k_eff 3, ceil(6/1)=6, total pad 2.
    assert win.padding == ((1, 1), (1, 1)) and win.out == (4, 6)
    win = resolve_window((5, 5), 3, padding=((2, 0), (0, 1)))
    assert win.padding == ((2, 0), (0, 1)) and win.out == (5, 4)


@pytest.mark.parametrize("padding", [(1, 2), ((1, 2, 3), (0, 0)), ((1, 2),)])
def test_resolve_window_rejects_malformed_explicit_padding(padding):
    with pytest.raises(ValueError, match="explicit padding"):
        resolve_window((5, 5), 3, padding=padding)


def test_pool_output_size_follows_keras():
    assert pool_output_size(7, 2) == 3  # stride defaults to the pool size
    assert pool_output_size(7, 2, padding="same") == 4
    assert pool_output_size(8, 3, 2, "valid") == 3


@pytest.mark.parametrize(
    "layers,expected",
    [
        ([], 1),
        ([(3, 1)], 3),
        ([(3, 1)] * 3, 7),
        ([(3, 2), (3, 1), (3, 1)], 11),
        ([(3, 1, 1), (3, 1, 2), (3, 1, 4)], 15),
        ([(7, 2), (3, 2), (3, 1), (3, 1)], 27),
    ],
)
def test_receptive_field(layers, expected):
    assert receptive_field(layers) == expected


def test_parameter_counts():
    assert conv_params(3, 3, 3, 16) == 448
    assert conv_params(3, 3, 3, 16, bias=False) == 432
    assert conv_params(1, 7, 8, 2) == 7 * 8 * 2 + 2
    assert dense_params(10, 5) == 55
    assert dense_params(10, 5, bias=False) == 50


STACKS = [
    [("conv", 3, 2, 1), ("conv", 3, 1, 1), ("conv", 3, 1, 1)],
    [("conv", 3, 1, 1), ("max", 2, 2, 1), ("conv", 3, 1, 2)],
    [("conv", 3, 1, 1), ("avg", 3, 2, 1), ("conv", 2, 1, 1)],
]


@pytest.mark.parametrize("layers", STACKS)
def test_empirical_receptive_field_matches_formula(layers):
    rf = stack_receptive_field(layers)
    assert empirical_receptive_field(random_stack(layers), (4, 24, 24, 2)) == (rf, rf)


def test_support_extent_rejects_all_zero_map():
    with pytest.raises(ValueError, match="all zero"):
        support_extent(np.zeros((3, 3)))
