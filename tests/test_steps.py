"""Train/eval steps: learning, no retracing, sharded == single device, eval semantics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import models, parallel, steps
from cnnjax.train_state import create_train_state


def make_state(name="cifar_cnn", tx=None):
    model = models.get(name, num_classes=10)
    tx = optax.adam(1e-3) if tx is None else tx
    return create_train_state(model, tx, jax.random.key(0), (16, 16, 3))


def make_batch(seed=0, n=16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.normal(k1, (n, 16, 16, 3)),
        "label": jax.random.randint(k2, (n,), 0, 10),
    }


def test_loss_falls_on_a_fixed_batch():
    state, batch = make_state("simple_cnn"), make_batch()
    step = jax.jit(steps.train_step)
    losses = []
    for _ in range(30):
        state, m = step(state, batch, jax.random.key(1))
        losses.append(float(m["loss"] / m["count"]))
    assert losses[-1] < 0.2 * losses[0]
    assert int(state.step) == 30


def test_train_step_traces_once():
    state = make_state()
    step = jax.jit(chex.assert_max_traces(steps.train_step, n=1), donate_argnums=0)
    for i in range(4):
        state, _ = step(state, make_batch(i), jax.random.key(0))
    assert int(state.step) == 4


def test_batchnorm_stats_move_in_train_and_eval_is_pure():
    state, batch = make_state(), make_batch()
    new_state, _ = jax.jit(steps.train_step)(state, batch, jax.random.key(0))
    before = jax.tree.leaves(state.batch_stats)
    after = jax.tree.leaves(new_state.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    logits1 = steps.predict_logits(new_state, batch["image"])
    logits2 = steps.predict_logits(new_state, batch["image"])
    np.testing.assert_array_equal(logits1, logits2)  # dropout off, stats frozen


def test_sharded_step_equals_single_device():
    """4 fake CPU devices vs 1: same params, BN statistics and metrics within 1e-5. BatchNorm
    has no axis_name: XLA reduces its statistics over the global (sharded) batch. (SGD: Adam's
    update divides by the root of tiny second moments, which magnifies float rounding.)"""
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"

    def run(mesh):
        state = jax.device_put(make_state(tx=optax.sgd(0.1, 0.9)), parallel.replicated(mesh))
        step = jax.jit(steps.train_step)
        for i in range(3):
            batch = jax.device_put(make_batch(i), parallel.batch_sharding(mesh))
            state, m = step(state, batch, jax.random.key(7))
        return jax.device_get((state.params, state.batch_stats, m))

    many = run(parallel.make_mesh())
    one = run(parallel.make_mesh(jax.devices()[:1]))
    chex.assert_trees_all_close(many, one, atol=1e-5, rtol=1e-5)


def test_eval_step_counts_only_masked_examples():
    state, batch = make_state(), make_batch()
    mask = jnp.arange(16) < 10
    m = steps.eval_step(state, {**batch, "mask": mask})
    full = steps.eval_step(state, {**{k: v[:10] for k, v in batch.items()}, "mask": mask[:10]})
    chex.assert_trees_all_close(m, full, rtol=1e-5)
    assert float(m["count"]) == 10 and float(m["confusion"].sum()) == 10


def test_label_smoothing_and_soft_labels():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    hard = steps.cross_entropy(logits, jnp.array([0]))
    smooth = steps.cross_entropy(logits, jnp.array([0]), label_smoothing=0.3)
    soft = steps.cross_entropy(logits, jnp.array([[0.8, 0.1, 0.1]]))
    expected = -(
        0.8 * jax.nn.log_softmax(logits)[0, 0] + 0.1 * jax.nn.log_softmax(logits)[0, 1:].sum()
    )
    np.testing.assert_allclose(smooth, soft, rtol=1e-6)
    np.testing.assert_allclose(soft[0], expected, rtol=1e-6)
    assert float(smooth[0]) > float(hard[0])
