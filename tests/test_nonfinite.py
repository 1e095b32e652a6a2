"""Non-finite loss or gradients: the first bad step stops the run (named exactly, the last good
checkpoint kept), or with ``skip_nonfinite`` the update is dropped, counted, and N in a row stop.

Bad steps are injected by wrapping ``steps.loss_and_grads``: a NaN image (loss and gradients
NaN) or NaN gradients behind a finite loss, at chosen update numbers (``state.step + 1``, the
numbers the messages and checkpoints use).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import configs, models
from cnnjax.errors import TrainingDivergedError
from cnnjax.run import checkpoint, metrics
from cnnjax.run.state import create_train_state
from cnnjax.train import loop, optim, steps

ORIGINAL = steps.loss_and_grads


def poisoned(bad_updates, what: str = "loss"):
    """``steps.loss_and_grads`` with NaN input images (``loss``: loss and gradients NaN) or NaN
    gradients and a finite loss (``gradients``) at the updates numbered ``bad_updates``."""

    def loss_and_grads(state, batch, key, label_smoothing, accum_steps=1):
        bad = jnp.isin(state.step + 1, jnp.array(bad_updates))
        if what == "loss":
            batch = {**batch, "image": batch["image"] * jnp.where(bad, jnp.nan, 1.0)}
            return ORIGINAL(state, batch, key, label_smoothing, accum_steps)
        grads, aux = ORIGINAL(state, batch, key, label_smoothing, accum_steps)
        return jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads), aux

    return loss_and_grads


def make_batch(seed=0, n=8):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.normal(k1, (n, 16, 16, 3)),
        "label": jax.random.randint(k2, (n,), 0, 10),
    }


def bn_state(tx, ema_decay=0.0):
    """cifar_cnn (BatchNorm, dropout) on 16x16x3 images."""
    model = models.get("cifar_cnn", num_classes=10)
    return create_train_state(model, tx, jax.random.key(0), (16, 16, 3), ema_decay=ema_decay)


@pytest.mark.parametrize("what", ["loss", "gradients"])
def test_a_nonfinite_step_is_its_stop_step_and_adds_no_sums(monkeypatch, what):
    monkeypatch.setattr(steps, "loss_and_grads", poisoned([2], what))
    state = create_train_state(
        models.get("simple_cnn", num_classes=10), optax.sgd(0.1), jax.random.key(0), (16, 16, 3)
    )
    chex.clear_trace_counter()  # the counts are per function, across the parametrized cases
    step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
    acc = {"loss": 0.0, "correct": 0.0, "count": 0.0, "stop_step": steps.NO_STEP}
    seen = []
    for i in range(3):
        state, m = step(state, make_batch(i), jax.random.key(0))
        seen.append(int(m["stop_step"]))
        acc = steps.add_metrics(acc, m)
        if i == 1:
            assert np.isfinite(float(m["loss"])) and float(m["count"]) == 0  # excluded
    # Update 2 is bad; its NaN parameters make update 3 bad too; the accumulation keeps 2.
    assert seen == [steps.NO_STEP, 2, 3] and int(acc["stop_step"]) == 2


def test_skipped_update_leaves_params_batch_stats_ema_and_optimizer_unchanged(monkeypatch):
    monkeypatch.setattr(steps, "loss_and_grads", poisoned([2, 3]))
    tx = optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=2)
    state = bn_state(tx, ema_decay=0.9)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(steps.train_step, n=1), static_argnames="skip_nonfinite")
    state, _ = step(state, make_batch(0), jax.random.key(0), skip_nonfinite=2)
    before = jax.device_get(state)
    state, m = step(state, make_batch(1), jax.random.key(0), skip_nonfinite=2)
    after = jax.device_get(state)
    for name in ("params", "batch_stats", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    jax.tree.map(
        np.testing.assert_array_equal, after.opt_state.inner_state, before.opt_state.inner_state
    )
    assert int(after.step) == 2 and int(after.opt_state.total_notfinite) == 1
    assert int(m["stop_step"]) == steps.NO_STEP and float(m["count"]) == 0
    # The second bad update in a row is the N-th (N = 2): the run must stop there.
    state, m = step(state, make_batch(2), jax.random.key(0), skip_nonfinite=2)
    assert int(m["stop_step"]) == 3
    state, m = step(state, make_batch(3), jax.random.key(0), skip_nonfinite=2)  # finite again
    assert int(state.opt_state.notfinite_count) == 0 and int(state.opt_state.total_notfinite) == 2
    moved = zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(after.batch_stats), strict=True)
    assert any(not np.array_equal(a, b) for a, b in moved)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))


def test_skip_nonfinite_wraps_the_whole_optimizer():
    config = configs.get("tiny")
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    plain, _ = optim.create_optimizer(config, 10)
    assert optim.skip_state(plain.init(params)) is None
    config.skip_nonfinite, config.grad_clip_norm, config.freeze = 3, 1.0, "dense/bias"
    tx, _ = optim.create_optimizer(config, 10)
    opt_state = tx.init(params)
    assert optim.skip_state(opt_state) is opt_state
    unwrapped = optim.convert_skip_state(opt_state, skip=False)
    chex.assert_trees_all_equal_structs(unwrapped, opt_state.inner_state)
    rewrapped = optim.convert_skip_state(unwrapped, skip=True)
    chex.assert_trees_all_equal(rewrapped, opt_state)


def run_config(tiny_config, **overrides):
    config = tiny_config.copy_and_resolve_references()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("what", ["loss", "gradients"])
def test_first_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path, monkeypatch, what
):
    # 16 updates an epoch, fetched every 5 (updates 21, 26, ... in epoch 2): update 23 is bad
    # (and its NaN parameters make every later one bad); the run stops at 26, naming 23.
    monkeypatch.setattr(steps, "loss_and_grads", poisoned([23], what))
    with pytest.raises(TrainingDivergedError) as raised:
        loop.train_and_evaluate(run_config(tiny_config), tmp_path)
    assert str(raised.value) == (
        "loss/gradients not finite at step 23 (epoch 2); the last good checkpoint (step 16, "
        "epoch 1) is kept: lower the learning rate or enable --config.grad_clip_norm or "
        "--config.skip_nonfinite"
    )
    assert checkpoint.manager(tmp_path, read_only=True).all_steps() == [16]
    assert [line["epoch"] for line in metrics.read_lines(tmp_path)] == [1]
    if what == "gradients":
        return
    # The advice works: the same workdir with skip mode resumes from step 16 (the optimizer
    # state wrapped afresh) and skips the bad update.
    line = loop.train_and_evaluate(run_config(tiny_config, skip_nonfinite=2), tmp_path)
    assert line["epoch"] == 2 and line["skipped_updates"] == 1
    assert np.isfinite(line["train_loss"]) and np.isfinite(line["test_loss"])


@pytest.mark.slow
def test_skip_mode_counts_skips_and_stops_at_n_in_a_row(tiny_config, tmp_path, monkeypatch):
    # Update 3 is skipped alone; 22 and 23 are 2 in a row, the most skip_nonfinite=2 allows.
    monkeypatch.setattr(steps, "loss_and_grads", poisoned([3, 22, 23]))
    config = run_config(tiny_config, skip_nonfinite=2)
    with pytest.raises(TrainingDivergedError) as raised:
        loop.train_and_evaluate(config, tmp_path)
    assert str(raised.value) == (
        "2 updates in a row with non-finite gradients were skipped, the most "
        "--config.skip_nonfinite=2 allows (steps 22-23, epoch 2); the last good checkpoint "
        "(step 16, epoch 1) is kept: lower the learning rate or enable --config.grad_clip_norm"
    )
    (line,) = metrics.read_lines(tmp_path)
    assert line["skipped_updates"] == 1 and metrics.all_finite(line)
    assert checkpoint.manager(tmp_path, read_only=True).all_steps() == [16]
    # Without the bad updates the same workdir goes on from step 16 with skip mode off (the
    # optimizer state unwrapped); the skips of epoch 1 stay in its line.
    monkeypatch.setattr(steps, "loss_and_grads", ORIGINAL)
    line = loop.train_and_evaluate(run_config(tiny_config), tmp_path)
    assert line["epoch"] == 2 and "skipped_updates" not in line
    assert [x.get("skipped_updates") for x in metrics.read_lines(tmp_path)] == [1, None]
