"""cnnjax.run.state through the steps that use it: the EMA and its decay warmup, evaluation
with the EMA weights, flip test-time augmentation, and bfloat16 compute over float32 state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import models
from cnnjax.run.state import create_train_state
from cnnjax.train import steps


def test_ema_tracks_params_with_decay_warmup_and_is_what_eval_uses():
    model = models.get("simple_cnn", 10)
    state = create_train_state(model, optax.sgd(0.5), jax.random.key(0), (8, 8, 1), ema_decay=0.9)
    grads = jax.tree.map(jnp.ones_like, state.params)

    def check(state, decay):
        new = state.apply_gradients(grads=grads)
        want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new.params)
        # Two float32 roundings apart (optax computes (1 - decay) * p + decay * e): 1e-6.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), want, new.ema_params)
        return new

    new = check(state, decay=0.1)  # step 0: min(0.9, 1 / 10)
    check(new.replace(step=jnp.asarray(1000)), decay=0.9)  # warmed up: ema_decay
    assert new.eval_params() is new.ema_params


def bn_state(ema_decay=0.0, dtype=jnp.float32):
    """cifar_cnn (BatchNorm and dropout) on 8x8x1 images, three classes."""
    model = models.get("cifar_cnn", num_classes=3, widths=(4, 4, 4), dtype=dtype)
    return create_train_state(
        model, optax.sgd(0.1, 0.9), jax.random.key(0), (8, 8, 1), ema_decay=ema_decay
    )


def images(n=6, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))


@pytest.mark.slow  # 17-27 s measured on 2 busy cores, mostly compiling
def test_evaluation_uses_the_ema_weights():
    """An EMA far from the raw weights: predict_logits and eval_step follow the EMA."""
    state = bn_state(ema_decay=0.99)
    ema = jax.tree.map(lambda p: p * 3.0 + 0.1, state.params)
    state = state.replace(ema_params=ema)
    x, y = images(), jnp.arange(6) % 3

    def logits_with(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        return state.apply_fn(variables, x, train=False)

    with_ema, with_raw = logits_with(ema), logits_with(state.params)
    assert not np.allclose(with_ema, with_raw)
    np.testing.assert_array_equal(steps.predict_logits(state, x), with_ema)
    sums = steps.eval_step(state, {"image": x, "label": y, "mask": jnp.ones(6, bool)})
    want = steps.metric_sums(with_ema, y, steps.cross_entropy(with_ema, y))
    for key, value in want.items():
        np.testing.assert_array_equal(sums[key], value, err_msg=key)


def test_flip_tta_logits_are_the_mean_of_the_two_passes():
    state = bn_state()
    x = images()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    plain = state.apply_fn(variables, x, train=False)
    mirrored = state.apply_fn(variables, x[:, :, ::-1], train=False)
    assert not np.allclose(plain, mirrored)  # the mirror pass is a different pass
    np.testing.assert_array_equal(
        steps.predict_logits(state, x, flip_tta=True), (plain + mirrored) / 2
    )


def primitive_dtypes(jaxpr, name: str) -> list:
    """Input dtypes of every ``name`` equation in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(tuple(v.aval.dtype for v in eqn.invars))
        for param in eqn.params.values():
            subs = param if isinstance(param, list | tuple) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += primitive_dtypes(inner, name)
    return found


@pytest.mark.slow  # 17-27 s measured on 2 busy cores, mostly compiling
def test_bfloat16_computes_in_bfloat16_over_float32_state():
    """The train step's convolutions and matmuls (forward and backward) take bfloat16 inputs,
    while params, optimizer state, EMA and BatchNorm statistics stay float32 after a step."""
    state = bn_state(ema_decay=0.9, dtype=jnp.bfloat16)
    batch = {"image": images(8).astype(jnp.bfloat16), "label": jnp.arange(8) % 3}
    key = jax.random.key(1)
    jaxpr = jax.make_jaxpr(steps.train_step)(state, batch, key).jaxpr
    convs = primitive_dtypes(jaxpr, "conv_general_dilated")
    dots = primitive_dtypes(jaxpr, "dot_general")
    # 6 convs: forward, input gradient (not for the first) and kernel gradient each.
    assert len(convs) == 6 + 5 + 6 and len(dots) >= 2 * 3
    assert {d for dtypes in convs + dots for d in dtypes} == {jnp.dtype(jnp.bfloat16)}
    new, _ = jax.jit(steps.train_step)(state, batch, key)
    float32 = {jnp.dtype(jnp.float32)}
    for part in ("params", "opt_state", "ema_params", "batch_stats"):
        leaves = [x for x in jax.tree.leaves(getattr(new, part)) if jnp.ndim(x) > 0]
        assert leaves and {x.dtype for x in leaves} == float32, part
    assert not np.array_equal(
        new.batch_stats["fc1_bn"]["mean"], state.batch_stats["fc1_bn"]["mean"]
    )
