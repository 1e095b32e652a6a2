"""cnnjax.run.checkpoint: a whole TrainState round-trips bit for bit, the latest N plus the best are
kept, every unusable checkpoint is a CheckpointError, and ``load_run`` opens a trained run
without its dataset or an optimizer, with exactly the checkpointed weights (the EMA when kept),
reading older config.json files too."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest

from cnnjax import configs, models, parallel
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import CheckpointError
from cnnjax.run import checkpoint, trained
from cnnjax.run.state import abstract_train_state
from cnnjax.train import loop, optim, resume
from cnnjax.train import setup as setup_lib

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
        trained.load_run_config(tmp_path)


# ---------------------------------------------------------------------------------- load_run


@pytest.fixture(scope="module")
def ema_run(fmnist_data_dir, tmp_path_factory):
    """A trained tiny run that keeps an EMA (so eval weights differ from the raw params)."""
    from cnnjax import configs

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    config.ema_decay = 0.9
    workdir = tmp_path_factory.mktemp("ema_run")
    loop.train_and_evaluate(config, workdir)
    return workdir


def full_state(workdir, step):
    """The whole TrainState at ``step``, restored the trainer's way (optimizer and dataset)."""
    config = trained.load_run_config(workdir)
    run = setup_lib.setup(config, workdir)
    mngr = trained.run_manager(config, workdir, read_only=True)
    return resume.restore(run, mngr, step)[0]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_load_run_restores_the_best_checkpoint_exactly(ema_run, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("load_run read the dataset")

    def no_optimizer(*args, **kwargs):
        raise AssertionError("load_run built an optimizer")

    with monkeypatch.context() as m:
        m.setattr(tfds_lib, "builder", no_data)
        m.setattr(optim, "create_optimizer", no_optimizer)
        run = trained.load_run(ema_run)
    mngr = trained.run_manager(run.config, ema_run, read_only=True)
    assert run.step == mngr.best_step()
    expected = full_state(ema_run, run.step)
    assert int(expected.step) == run.step and run.epoch == run.step // 16
    assert run.state.tx is None and run.state.opt_state is None
    assert run.input_shape == (28, 28, 1) and run.info.class_names[0] == "T-shirt/top"
    assert type(run.model).__name__ == "SimpleCNN"
    assert_trees_equal(run.state.params, expected.params)
    assert_trees_equal(run.state.ema_params, expected.ema_params)
    # Evaluation's weights are the EMA, and the EMA differs from the raw params.
    assert_trees_equal(run.variables["params"], expected.ema_params)
    diff = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), expected.params, expected.ema_params
    )
    assert max(jax.tree.leaves(diff)) > 0


@pytest.mark.slow
def test_load_run_at_a_step_and_unknown_steps(ema_run):
    run = trained.load_run(ema_run, step=16)
    assert run.step == 16 and run.epoch == 1
    assert_trees_equal(run.state.params, full_state(ema_run, 16).params)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 .* have: \[16, 32\]"):
        trained.load_run(ema_run, step=7)


@pytest.mark.slow
def test_load_run_reads_a_config_json_of_an_older_version(ema_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(ema_run, old)
    saved = json.loads((old / "config.json").read_text())
    saved["model"], saved["model_kwargs"] = saved["model"]["name"], "{}"
    (old / "config.json").write_text(json.dumps(saved))
    run = trained.load_run(old)
    assert dict(run.config.model) == {"name": "simple_cnn"} and "model_kwargs" not in run.config
    assert_trees_equal(run.state.params, trained.load_run(ema_run).state.params)


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a cnnjax run directory .no config.json"):
        trained.load_run(tmp_path)
    (tmp_path / "config.json").write_text("")  # a truncated copy
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        trained.load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "simple_cnn"}}))
    with pytest.raises(CheckpointError, match="config.json lacks dataset, dtype, data, check"):
        trained.load_run(tmp_path)
    (tmp_path / "config.json").write_text(configs.get("tiny").to_json())
    with pytest.raises(CheckpointError, match="no dataset.json.*never trained"):
        trained.load_run(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "fashion_mnist"}))
    with pytest.raises(CheckpointError, match="dataset.json lacks image_shape, num_classes"):
        trained.load_run(tmp_path)
