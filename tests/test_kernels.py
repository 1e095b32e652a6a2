"""cnnjax.nn.kernels: oneDNN convolutions (forward, both gradients) vs lax, and the backend switch.

The extension is built here if it is not yet (``bash setup.sh`` installs libdnnl-dev and builds
it; CI runs that first). Without oneDNN the numerical tests skip; the switch tests still run.
"""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import balanced_cases
from jax import lax

from cnnjax.nn import kernels
from cnnjax.nn.kernels import build, onednn
from cnnjax.nn.layers import ConvBN

DN = ("NHWC", "HWIO", "NHWC")
U = 2.0**-24  # float32 unit roundoff
# groups -> (C, O); "depthwise" is groups == C with a channel multiplier of 2.
CHANNELS = {1: (3, 5), 2: (4, 6), "depthwise": (3, 6)}
PADDINGS = ("VALID", "SAME", ((2, 0), (1, 3)), ((0, 1), (1, 0)))
# kernel, stride (h, w), padding, dilation, groups, batch
FACTORS = ((1, 2, 3, 5), ((1, 1), (2, 2), (2, 1)), PADDINGS, (1, 2), tuple(CHANNELS), (1, 2, 5))
CASES = balanced_cases(FACTORS, 16, seed=1)


@pytest.fixture(scope="module")
def lib():
    try:
        return onednn.load()
    except (build.BuildError, OSError) as e:
        pytest.skip(f"oneDNN extension unavailable: {e}")


@pytest.fixture
def backend():
    """Restores the process's conv backend after a test that selects one."""
    saved = dict(kernels._state)
    yield kernels.select
    kernels._state.update(saved)


def operands(k, dilation, group_key, batch, seed):
    """x (batch, H, W, C) with random odd or even H != W fitting the dilated kernel, and w."""
    rng = np.random.default_rng(seed)
    c, o = CHANNELS[group_key]
    groups = c if group_key == "depthwise" else group_key
    eff = (k - 1) * dilation + 1
    h = eff + int(rng.integers(0, 6))
    w = eff + int(rng.integers(0, 6))
    x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((k, k, c // groups, o)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(kernel), groups


def fwd_and_grads(conv, x, w, dy, **kw):
    """(y, dx, dw) of ``conv`` at (x, w) with output cotangent dy, jitted."""

    def run(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: conv(x, w, dimension_numbers=DN, **kw), x, w)
        return (y, *vjp(dy))

    return jax.jit(run)(x, w, dy)


@pytest.mark.parametrize("k,stride,padding,dilation,group_key,batch", CASES)
def test_forward_and_gradients_match_lax(lib, k, stride, padding, dilation, group_key, batch):
    """Every output of the three directions is a sum of K products: forward K = kh kw C/G, input
    gradient at most kh kw O/G, kernel gradient N OH OW. Each of oneDNN and lax computes it in
    float32 within gamma_K = K u / (1 - K u) of sum |terms| (Higham, eq. 3.5, any summation order
    or FMA), so they differ by at most 2 (K + 1) u sum |terms|: the bound below, elementwise,
    with sum |terms| from the same map applied to |x|, |w| and |dy|."""
    x, w, groups = operands(k, dilation, group_key, batch, seed=hash((k, stride, batch)) % 1000)
    kw = dict(
        window_strides=stride,
        padding=padding,
        rhs_dilation=(dilation, dilation),
        feature_group_count=groups,
    )
    assert onednn.supported(x, w, lhs_dilation=None, dimension_numbers=DN, **kw)
    y_shape = jax.eval_shape(lambda: lax.conv_general_dilated(x, w, dimension_numbers=DN, **kw))
    dy = jnp.asarray(np.random.default_rng(batch).standard_normal(y_shape.shape), jnp.float32)
    got = fwd_and_grads(onednn.conv, x, w, dy, **kw)
    want = fwd_and_grads(lax.conv_general_dilated, x, w, dy, **kw)
    mags = fwd_and_grads(lax.conv_general_dilated, abs(x), abs(w), abs(dy), **kw)
    n, oh, ow, o = y_shape.shape
    terms = (k * k * x.shape[-1] // groups, k * k * o // groups, n * oh * ow)
    for name, g, r, m, K in zip(("y", "dx", "dw"), got, want, mags, terms, strict=True):
        assert g.shape == r.shape, name
        err = np.abs(np.asarray(g) - np.asarray(r))
        bound = 2 * (K + 1) * U * np.asarray(m)
        assert np.all(err <= bound), (name, float(np.max(err / np.maximum(bound, 1e-30))))


def test_jit_traces_once_and_vmap_matches_lax(lib):
    """A second call with the same shapes reuses the trace; vmap over a leading axis of x and w
    (per-example kernels, as in per-example gradients) equals lax's vmap."""
    x, w, groups = operands(3, 1, 2, batch=2, seed=3)
    kw = dict(window_strides=(2, 1), padding=((1, 0), (0, 1)), feature_group_count=groups)
    traces = []

    def loss(x, w):
        traces.append(1)
        return jnp.sum(onednn.conv(x, w, dimension_numbers=DN, **kw) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grad(x, w)
    grad(x + 1, w * 2)
    assert len(traces) == 1

    def ref_loss(x, w):
        return jnp.sum(lax.conv_general_dilated(x, w, dimension_numbers=DN, **kw) ** 2)

    xs, ws = jnp.stack([x, -x, 2 * x]), jnp.stack([w, w[::-1], -w])
    for f, g in ((loss, ref_loss), (jax.grad(loss, 1), jax.grad(ref_loss, 1))):
        got, want = jax.jit(jax.vmap(f))(xs, ws), jax.vmap(g)(xs, ws)
        # Sums of squares of K = 3 * 3 * 2 term sums: relative float32 rounding, with room.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unsupported_calls_fall_back_to_lax(lib, backend):
    """Input dilation, bfloat16 and NCHW are not oneDNN's here: the dispatcher gives lax's."""
    backend("onednn")
    x, w, _ = operands(3, 1, 1, batch=2, seed=4)
    cases = (
        (x, w, dict(lhs_dilation=(2, 2), dimension_numbers=DN)),
        (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dict(dimension_numbers=DN)),
        (x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), {}),
    )
    for lhs, rhs, kw in cases:
        conv = lambda a, b, kw=kw: kernels.conv_general_dilated(a, b, (1, 1), ((1, 1),) * 2, **kw)
        jaxpr = str(jax.make_jaxpr(conv)(lhs, rhs))
        assert "conv_general_dilated" in jaxpr and "Onednn" not in jaxpr


def test_backend_switch_routes_the_layers(lib, backend):
    """``xla`` leaves ConvBN's program a lax conv; ``onednn`` makes it custom calls with the
    same output within float32 rounding (K = 3 * 3 * 3 terms)."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 7, 3)), jnp.float32)
    layer = ConvBN(4, strides=(2, 2), padding=1)
    variables = layer.init(jax.random.key(0), x)
    outs = {}
    for name in ("xla", "onednn"):
        assert backend(name) == name
        apply = lambda v, x: layer.apply(v, x)  # a new function: traced with this backend
        text = str(jax.make_jaxpr(apply)(variables, x))
        assert ("CnnjaxOnednnConvFwd" in text) == (name == "onednn")
        outs[name] = jax.jit(apply)(variables, x)
    np.testing.assert_allclose(outs["onednn"], outs["xla"], rtol=1e-5, atol=1e-5)


def test_resolve_names_env_and_auto(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.resolve("xla") == "xla"
    assert kernels.resolve("auto") == kernels.AUTO == kernels.resolve(None)
    monkeypatch.setenv(kernels.ENV, "xla")
    assert kernels.resolve("auto") == "xla"
    with pytest.raises(ValueError, match="not one of auto, xla, onednn"):
        kernels.resolve("mkl")


def test_unloadable_extension_falls_back_with_one_log_line(monkeypatch, caplog):
    def fail(build_if_missing=True):
        raise build.BuildError("no compiler")

    monkeypatch.setattr(onednn, "load", fail)
    with caplog.at_level(logging.WARNING, logger="cnnjax.nn.kernels"):
        assert kernels.resolve("onednn") == "xla"
    assert [r.getMessage() for r in caplog.records] == [
        "oneDNN convolutions unavailable, using XLA's: no compiler"
    ]


def test_conv_backend_is_a_checked_config_key():
    from cnnjax.configs import tiny, validation
    from cnnjax.errors import ConfigError

    config = tiny.get_config()
    assert config.conv_backend == "auto"
    config.conv_backend = "cudnn"
    with pytest.raises(ConfigError, match="conv_backend"):
        validation.check(config)


def test_nn_conv_accepts_the_dispatcher():
    """Flax passes its own keyword names; the dispatcher must take them all."""
    conv = nn.Conv(2, (3, 3), conv_general_dilated=kernels.conv_general_dilated)
    x = jnp.ones((1, 5, 5, 1))
    variables = conv.init(jax.random.key(0), x)
    assert conv.apply(variables, x).shape == (1, 5, 5, 2)


def test_trainer_records_the_resolved_backend(lib, backend, monkeypatch, tmp_path):
    """config.json gets what ran: ``auto`` becomes ``kernels.AUTO``, or ``$CNNJAX_CONV``."""
    from cnnjax.configs import tiny
    from cnnjax.train import setup as setup_lib

    monkeypatch.delenv(kernels.ENV, raising=False)
    config = tiny.get_config()
    assert setup_lib.check(config) == kernels.AUTO
    monkeypatch.setenv(kernels.ENV, "onednn")
    config = tiny.get_config()
    assert setup_lib.check(config) == "onednn" == kernels.active()
    setup_lib.write_config(config, tmp_path, "onednn")
    assert json.loads((tmp_path / "config.json").read_text())["conv_backend"] == "onednn"
