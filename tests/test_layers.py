"""Layers: shapes, closed-form outputs, BatchNorm train/eval semantics, residual shortcuts."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.nn.layers import (
    BottleneckBlock,
    ConvBN,
    DenseHead,
    GlobalAvgPool,
    ResidualBlock,
    batch_norm,
)


def init(module, x, **kw):
    return module.init(jax.random.key(0), x, **kw)


def n_params(variables):
    return sum(p.size for p in jax.tree.leaves(variables["params"]))


def test_convbn_closed_form_with_ones():
    """A 3x3 conv of ones on ones, VALID: every output is 9 * C_in (+0 bias), ReLU keeps it."""
    block = ConvBN(4, padding="VALID", norm=None)
    x = jnp.ones((2, 5, 5, 3))
    variables = init(block, x)
    variables = jax.tree.map(jnp.ones_like, variables)  # kernel and bias all ones
    y = block.apply(variables, x)
    assert y.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(y, 9 * 3 + 1)
    assert n_params(variables) == 3 * 3 * 3 * 4 + 4


def test_convbn_with_norm_has_no_bias_and_injected_activation():
    block = ConvBN(8, norm=batch_norm(train=False), act=jnp.tanh)
    variables = init(block, jnp.ones((1, 6, 6, 2)))
    assert set(variables["params"]) == {"conv", "bn"}
    assert "bias" not in variables["params"]["conv"]
    assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
    y = block.apply(variables, jnp.full((1, 6, 6, 2), 10.0))
    assert float(jnp.max(jnp.abs(y))) <= 1.0  # tanh, not relu


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return ConvBN(4, norm=batch_norm(train))(x)


def test_batchnorm_updates_stats_in_train_and_freezes_them_in_eval():
    net = _Net()
    x = jax.random.normal(jax.random.key(1), (8, 4, 4, 3)) * 3 + 2
    variables = init(net, x)
    _, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
    before, after = variables["batch_stats"], updates["batch_stats"]
    assert not np.allclose(before["ConvBN_0"]["bn"]["mean"], after["ConvBN_0"]["bn"]["mean"])
    # Eval: nothing mutable, and the output depends on the running stats, not on the batch.
    y1 = net.apply(variables, x, train=False)
    y2 = net.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(y1[:1], y2, rtol=1e-5, atol=1e-6)
    with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
        net.apply(variables, x, train=True)  # train mode needs mutable batch_stats


@pytest.mark.slow  # 17-27 s measured on 2 busy cores, mostly compiling
def test_residual_block_identity_and_projection():
    x = jnp.ones((2, 8, 8, 16))
    same = ResidualBlock(16, norm=batch_norm(False))
    v = init(same, x)
    assert "proj" not in v["params"] and same.apply(v, x).shape == (2, 8, 8, 16)
    down = ResidualBlock(32, strides=2, norm=batch_norm(False))
    v = init(down, x)
    assert "proj" in v["params"] and down.apply(v, x).shape == (2, 4, 4, 32)
    # Basic block 16->32/2 with projection: 3x3x16x32 + 3x3x32x32 + 1x1x16x32 + 3 BNs.
    assert n_params(v) == 9 * 16 * 32 + 9 * 32 * 32 + 16 * 32 + 3 * 2 * 32


@pytest.mark.slow  # 17-27 s measured on 2 busy cores, mostly compiling
def test_pad_shortcut_is_parameter_free_and_zero_pads_channels():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    block = ResidualBlock(32, strides=2, norm=batch_norm(False), shortcut="pad")
    v = init(block, x)
    assert "proj" not in v["params"]
    # Zero the residual branch (last BN scale and shift 0): output = relu(padded shortcut).
    v = jax.tree.map(lambda a: a, v)
    v["params"]["conv_bn2"]["bn"]["scale"] = jnp.zeros(32)
    y = block.apply(v, x)
    expected = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
    np.testing.assert_allclose(y, jax.nn.relu(expected), atol=1e-6)


@pytest.mark.slow  # 17-27 s measured on 2 busy cores, mostly compiling
def test_zero_init_residual_makes_block_start_as_identity():
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 4, 4, 64)))
    for block in (
        ResidualBlock(64, norm=batch_norm(False), zero_init_residual=True),
        BottleneckBlock(16, norm=batch_norm(False), zero_init_residual=True),
    ):
        y = block.apply(init(block, x), x)
        np.testing.assert_allclose(y, x, atol=1e-6)


def test_bottleneck_expands_and_projects():
    x = jnp.ones((1, 8, 8, 64))
    block = BottleneckBlock(64, strides=2, norm=batch_norm(False))
    v = init(block, x)
    assert block.apply(v, x).shape == (1, 4, 4, 256)
    convs = 64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256
    assert n_params(v) == convs + 2 * (64 + 64 + 256 + 256)


def test_global_avg_pool_and_head():
    x = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4)
    np.testing.assert_allclose(GlobalAvgPool().apply({}, x), x.mean((1, 2)))
    head = DenseHead(5, dropout=0.5, dtype=jnp.bfloat16)
    feats = jnp.ones((2, 4))
    v = init(head, feats)
    logits = head.apply(v, feats)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    # Dropout: deterministic in eval, random in train.
    np.testing.assert_array_equal(head.apply(v, feats), head.apply(v, feats))
    train_out = head.apply(v, feats, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_out, logits)


def test_bfloat16_compute_keeps_float32_params_and_stats():
    block = ConvBN(4, norm=batch_norm(False, jnp.bfloat16), dtype=jnp.bfloat16)
    v = init(block, jnp.ones((1, 4, 4, 3)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
    assert block.apply(v, jnp.ones((1, 4, 4, 3))).dtype == jnp.bfloat16
