"""cnnjax.checkpoint: ``load_run`` opens a trained run without its dataset or an optimizer, gives
exactly the checkpointed weights (the EMA when kept), reads older config.json files, and fails
in one line on what is not a usable run."""

import json

import jax
import numpy as np
import pytest

from cnnjax import checkpoint, configs, optim, trainer
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import CheckpointError


@pytest.fixture(scope="module")
def ema_run(fmnist_data_dir, tmp_path_factory):
    """A trained tiny run that keeps an EMA (so eval weights differ from the raw params)."""
    from cnnjax import configs

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    config.ema_decay = 0.9
    workdir = tmp_path_factory.mktemp("ema_run")
    trainer.train_and_evaluate(config, workdir)
    return workdir


def full_state(workdir, step):
    """The whole TrainState at ``step``, restored the trainer's way (optimizer and dataset)."""
    config = checkpoint.load_run_config(workdir)
    run = trainer.setup(config, workdir)
    model = trainer.build_model(config, run.data.info.num_classes)
    tx, _ = optim.create_optimizer(config, run.steps_per_epoch)
    mngr = checkpoint.run_manager(config, workdir, read_only=True)
    return trainer.restore(run, mngr, model, tx, step)[0]


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
        run = checkpoint.load_run(ema_run)
    mngr = checkpoint.run_manager(run.config, ema_run, read_only=True)
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
    run = checkpoint.load_run(ema_run, step=16)
    assert run.step == 16 and run.epoch == 1
    assert_trees_equal(run.state.params, full_state(ema_run, 16).params)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 .* have: \[16, 32\]"):
        checkpoint.load_run(ema_run, step=7)


@pytest.mark.slow
def test_load_run_reads_a_config_json_of_an_older_version(ema_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ema_run, old)
    saved = json.loads((old / "config.json").read_text())
    saved["model"], saved["model_kwargs"] = saved["model"]["name"], "{}"
    (old / "config.json").write_text(json.dumps(saved))
    run = checkpoint.load_run(old)
    assert dict(run.config.model) == {"name": "simple_cnn"} and "model_kwargs" not in run.config
    assert_trees_equal(run.state.params, checkpoint.load_run(ema_run).state.params)


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a cnnjax run directory .no config.json"):
        checkpoint.load_run(tmp_path)
    (tmp_path / "config.json").write_text("")  # a truncated copy
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        checkpoint.load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "simple_cnn"}}))
    with pytest.raises(CheckpointError, match="config.json lacks dataset, dtype, data, check"):
        checkpoint.load_run(tmp_path)
    (tmp_path / "config.json").write_text(configs.get("tiny").to_json())
    with pytest.raises(CheckpointError, match="no dataset.json.*never trained"):
        checkpoint.load_run(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "fashion_mnist"}))
    with pytest.raises(CheckpointError, match="dataset.json lacks image_shape, num_classes"):
        checkpoint.load_run(tmp_path)
