"""End to end on the tiny preset: outputs, resume, bit-identical restarts, evaluate, errors."""

import gzip
import json

import jax
import numpy as np
import pytest
from conftest import variant

from cnnjax import models
from cnnjax.data.feed import StreamedFeed
from cnnjax.errors import CheckpointError, ConfigError, TrainingDivergedError
from cnnjax.run import checkpoint
from cnnjax.run import metrics as metrics_lib
from cnnjax.tools import summary
from cnnjax.tools.evaluate import evaluate_run
from cnnjax.train import hooks, loop, resume
from cnnjax.train import setup as setup_lib

# Every epoch line holds the metric names checkpoints can be ranked by, defined once.
LINE_KEYS = {"epoch", *metrics_lib.EPOCH_METRICS}


def final_params(config, workdir):
    """The params of the latest checkpoint in ``workdir``."""
    run = setup_lib.setup(config, workdir)
    mngr = checkpoint.manager(workdir, read_only=True)
    state, meta = resume.restore(run, mngr)
    return jax.device_get(state.params), meta


@pytest.mark.slow
def test_tiny_run_writes_metrics_checkpoints_and_config(tiny_config, tmp_path, monkeypatch):
    peak = 1e9  # a made-up peak for the CPU (the table knows accelerators only)
    monkeypatch.setattr(loop.flops_lib, "peak_flops", lambda device, dtype: peak)
    line = loop.train_and_evaluate(tiny_config, tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert set(lines[0]) >= LINE_KEYS and "test_accuracy" not in lines[0]
    # MFU = XLA's FLOPs per step on one device (its part of the SPMD program) x steps/s / the
    # device's peak. Per image, about 3x the forward pass's FLOPs (forward, and a backward pass
    # of twice its work), plus the optimizer and the rest.
    forward = summary.summary(models.get("simple_cnn", num_classes=10), (28, 28, 1)).flops
    devices = jax.device_count()
    per_image = [x["mfu"] * peak * devices / x["train_images_per_sec"] for x in lines]
    assert all(2.5 * forward < f < 4 * forward for f in per_image), (per_image, forward)
    assert {"test_loss", "test_accuracy"} <= set(lines[-1]) and lines[-1] == line
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    # 2 tiny epochs on 512 images: 0.6953 measured on seed 0; a floor 4.5 points (23 images) below.
    assert lines[-1]["test_accuracy"] > 0.65
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"] == {"name": "simple_cnn"} and saved["dataset"] == "fashion_mnist"
    assert json.loads((tmp_path / "dataset.json").read_text())["num_classes"] == 10
    assert any((tmp_path / "tensorboard").iterdir())
    mngr = checkpoint.manager(tmp_path, read_only=True)
    assert mngr.all_steps() == [16, 32]  # 512 / 32 = 16 steps per epoch

    # The same command again is a no-op; evaluate agrees exactly with the trainer's last test
    # line (the same jitted eval step on the same restored state).
    assert loop.train_and_evaluate(tiny_config, tmp_path) == line
    result = evaluate_run(tmp_path, step=32, split="test")
    assert result["test_accuracy"] == line["test_accuracy"]
    assert result["test_loss"] == line["test_loss"]
    assert sum(map(sum, result["confusion"])) == 512


@pytest.mark.slow
def test_resume_is_bit_identical_and_trains_only_remaining_epochs(tiny_config, tmp_path):
    straight = tmp_path / "straight"
    loop.train_and_evaluate(tiny_config, straight)

    resumed = tmp_path / "resumed"
    first = tiny_config.copy_and_resolve_references()
    first.num_epochs = 1
    loop.train_and_evaluate(first, resumed)
    loop.train_and_evaluate(tiny_config, resumed)
    epochs = [json.loads(s)["epoch"] for s in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]

    a, meta_a = final_params(tiny_config, straight)
    b, meta_b = final_params(tiny_config, resumed)
    assert meta_a["epoch"] == meta_b["epoch"] == 2
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_step_functions_compile_once(tiny_config, tmp_path):
    run = setup_lib.setup(tiny_config, tmp_path)
    state = resume.initial_state(run)
    writer = loop.metrics_lib.Writer(tmp_path)
    for epoch in range(2):
        state, _, _ = loop.epoch_steps(run, state, epoch, writer, epoch == 0)
        hooks.split_metrics(run, state, "validation")
    assert run.train_fn._cache_size() == 1 and run.eval_fn._cache_size() == 1


def test_workdir_of_another_run_is_refused(tiny_config, tmp_path):
    setup_lib.write_config(tiny_config, tmp_path, "xla")
    other = tiny_config.copy_and_resolve_references()
    other.model.name = "cifar_cnn"
    with pytest.raises(CheckpointError, match="different run.*simple_cnn.*cifar_cnn"):
        loop.train_and_evaluate(other, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"] == {"name": "simple_cnn"}


@pytest.mark.slow
def test_test_every_epoch_writes_test_metrics_on_every_line(tiny_config, tmp_path):
    config = variant(tiny_config, test_every_epoch=True, **{"data.limit_examples": 128})
    loop.train_and_evaluate(config, tmp_path)
    lines = metrics_lib.read_lines(tmp_path)
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all({"test_loss", "test_accuracy"} <= set(x) for x in lines)
    # Epoch 1's test figure is the state epoch 1 ended with: the checkpoint it saved.
    result = evaluate_run(tmp_path, step=lines[0]["step"], split="test")
    assert result["test_accuracy"] == lines[0]["test_accuracy"]


@pytest.mark.slow
def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    good = tiny_config.copy_and_resolve_references()
    good.num_epochs = 1
    loop.train_and_evaluate(good, tmp_path)
    bad = tiny_config.copy_and_resolve_references()
    bad.learning_rate = 1e30  # nan is refused before training; this overflows at once
    # Update 17 (epoch 2's first) is computed from good weights, so its loss and gradients are
    # finite; Adam's first step moves each weight by about +-1e30, and update 18's forward pass
    # overflows float32 (two stacked 1e30-weight layers): 18 is the first bad step, named though
    # the run only looks at the metrics after update 21 (log_every_steps=5).
    with pytest.raises(TrainingDivergedError) as raised:
        loop.train_and_evaluate(bad, tmp_path)
    assert str(raised.value).startswith(
        "loss/gradients not finite at step 18 (epoch 2); the last good checkpoint (step 16, "
        "epoch 1) is kept"
    )
    assert checkpoint.manager(tmp_path, read_only=True).all_steps() == [16]
    params, meta = final_params(good, tmp_path)
    assert meta["epoch"] == 1
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_streaming_path_trains_and_evaluates_every_example(tiny_config, tmp_path):
    config = tiny_config.copy_and_resolve_references()
    config.num_epochs = 1
    config.data.in_memory = "no"
    run = setup_lib.setup(config, tmp_path)
    assert isinstance(run.feed, StreamedFeed)
    line = loop.train_and_evaluate(config, tmp_path)
    # One epoch of 16 steps: 0.6816 measured on seed 0; a floor 5 points below.
    assert line["test_accuracy"] > 0.63
    result = evaluate_run(tmp_path, split="test")  # streams too: the run's config says so
    assert result["test_accuracy"] == line["test_accuracy"]
    assert np.sum(result["confusion"]) == 512  # the padded last batch is masked, none twice


@pytest.mark.slow
def test_fashion_mnist_best_recipe_runs_end_to_end(fmnist_data_dir, tmp_path):
    # The preset's whole recipe (BatchNorm and dropout model, one-cycle SGD, EMA) at a tiny size.
    from cnnjax import configs

    config = configs.get("fashion_mnist_best")
    config.data.data_dir = fmnist_data_dir
    config.data.limit_examples = 256
    config.model.widths = (4, 8, 8)
    config.num_epochs, config.batch_size, config.warmup_epochs = 1, 32, 0.5
    line = loop.train_and_evaluate(config, tmp_path)
    # 8 steps of a 4-8-8 net: 0.2539 measured on seed 0, chance 0.1; a floor at twice chance.
    assert line["test_accuracy"] > 0.2


@pytest.mark.slow
def test_profile_traces_exactly_the_chosen_steps(tiny_config, tmp_path):
    config = variant(tiny_config, profile="3:2", **{"data.limit_examples": 128})
    loop.train_and_evaluate(config, tmp_path)
    (run,) = (tmp_path / "profile" / "plugins" / "profile").iterdir()
    assert list(run.glob("*.xplane.pb"))  # TensorBoard's profile plugin reads these
    with gzip.open(run / "perfetto_trace.json.gz") as f:  # Perfetto's
        events = json.load(f)["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [3, 4]


def test_deterministic_needs_its_xla_flags_where_the_platform_has_them():
    setup_lib.check_deterministic(True, "cpu", "")  # CPU runs are deterministic as they are
    setup_lib.check_deterministic(False, "gpu", "")
    setup_lib.check_deterministic(True, "gpu", "--xla_gpu_deterministic_ops=true")
    with pytest.raises(ConfigError, match="needs XLA_FLAGS to hold --xla_gpu_deterministic_ops"):
        setup_lib.check_deterministic(True, "gpu", "--xla_gpu_deterministic_ops=false")


@pytest.mark.slow
def test_two_deterministic_runs_are_bit_identical(tiny_config, tmp_path):
    config = variant(tiny_config, deterministic=True, num_epochs=1, **{"data.limit_examples": 128})
    lines = []
    for name in ("a", "b"):
        lines.append(loop.train_and_evaluate(config, tmp_path / name))
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["deterministic"] is True and "xla_flags" in saved
    timing = ("train_images_per_sec", "wall_s")
    assert [{k: v for k, v in x.items() if k not in timing} for x in lines[:1]] == [
        {k: v for k, v in x.items() if k not in timing} for x in lines[1:]
    ]
    a, _ = final_params(config, tmp_path / "a")
    b, _ = final_params(config, tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, a, b)
