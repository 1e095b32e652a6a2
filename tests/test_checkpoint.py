"""cnnjax.checkpoint: a whole TrainState round-trips bit for bit, the latest N plus the best are
kept, and every unusable checkpoint is a CheckpointError."""

import shutil

import jax
import numpy as np
import optax
import pytest

from cnnjax import checkpoint, models, parallel
from cnnjax.errors import CheckpointError
from cnnjax.train_state import abstract_train_state

SHAPE = (8, 8, 1)


def parts(widths):
    """A BatchNorm + dropout model with momentum, an EMA and ReduceLROnPlateau."""
    model = models.get("cifar_cnn", num_classes=3, widths=widths)
    tx = optax.sgd(0.1, momentum=0.9)
    options = {"ema_decay": 0.9, "plateau": optax.contrib.reduce_on_plateau(patience=1)}
    return model, tx, options


def restore_target(widths=(2, 2, 2)):
    """The abstract state (no compute) placed on one device."""
    model, tx, options = parts(widths)
    target = abstract_train_state(model, tx, jax.random.key(0), SHAPE, **options)
    mesh = parallel.make_mesh(jax.devices()[:1])
    return checkpoint.abstract_with_sharding(target, parallel.replicated(mesh))


@pytest.fixture(scope="module")
def state():
    """A TrainState of the model with a distinct random value in every leaf (params, momentum,
    EMA, BatchNorm statistics, plateau, step), built on the host: nothing to compile."""
    model, tx, options = parts((2, 2, 2))
    abstract = abstract_train_state(model, tx, jax.random.key(0), SHAPE, **options)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (10 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
    return state.replace(step=np.int32(2))


def test_whole_state_round_trips_bit_for_bit(state, tmp_path):
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, state, epoch=1, metrics={"eval_accuracy": 0.5})
    mngr.wait_until_finished()
    restored, meta = checkpoint.restore(mngr, restore_target())
    assert meta == {"epoch": 1, "eval_accuracy": 0.5}
    assert int(restored.step) == 2
    want = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    got = jax.tree.leaves(jax.device_get(restored))
    assert len(want) == len(got)
    for (path, a), b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path), strict=True)
    mngr.close()


def test_keeps_the_latest_n_and_the_best(state, tmp_path):
    mngr = checkpoint.manager(tmp_path, max_to_keep=2, best_metric="eval_loss", best_mode="min")
    for step, loss in enumerate([0.9, 0.1, 0.5, 0.7, 0.8], start=1):
        checkpoint.save(mngr, state.replace(step=step), step, {"eval_loss": loss})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 4, 5] and mngr.best_step() == 2
    mngr.close()


@pytest.fixture
def saved(state, tmp_path):
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, state, epoch=1, metrics={})
    mngr.wait_until_finished()
    yield mngr, restore_target()
    mngr.close()


def test_missing_step_is_a_checkpoint_error(saved):
    mngr, target = saved
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 .*have: \[2\]"):
        checkpoint.restore(mngr, target, step=7)


def test_checkpoint_of_another_model_is_a_checkpoint_error(saved):
    mngr, _ = saved
    with pytest.raises(CheckpointError, match="does not match this config or is corrupt"):
        checkpoint.restore(mngr, restore_target(widths=(4, 4, 4)))


def test_damaged_checkpoint_is_a_checkpoint_error(saved):
    mngr, target = saved
    shutil.rmtree(mngr.directory / "2" / "state")
    with pytest.raises(CheckpointError, match="does not match this config or is corrupt"):
        checkpoint.restore(mngr, target)


def test_a_directory_without_config_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a cnnjax run directory"):
        checkpoint.load_run_config(tmp_path)
