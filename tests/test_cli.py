"""The command-line tools as a user runs them: one-line errors, and a SIGKILLed run that resumes
to exactly the parameters of an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnnjax import checkpoint


def run_cli(module, *args, cwd, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config.model=resnet9000"], ["unknown model 'resnet9000'", "simple_cnn"]),
        (
            ["--config=nonexistent"],
            ["unknown config preset 'nonexistent'", "default, fashion_mnist_best"],
        ),
        (["--config.optimizer=adamax"], ["unknown optimizer 'adamax'", "adamw"]),
        (
            ["--config.dataset=kmnist", "--config.data.download=False"],
            ["dataset 'kmnist' is not prepared", "local_dir"],
        ),
    ],
)
def test_train_errors_are_one_line(tmp_path, args, fragments):
    data_dir = f"--config.data.data_dir={tmp_path / 'tfds'}"
    result = run_cli("cnnjax.train", "--config=tiny", f"--workdir={tmp_path / 'w'}", data_dir,
                     *args, cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, *fragments)


def test_evaluate_on_a_non_run_directory(tmp_path):
    result = run_cli("cnnjax.evaluate", f"--workdir={tmp_path}", cwd=tmp_path)
    assert_one_line_error(result, "not a cnnjax run directory")


def test_killed_run_resumes_to_identical_parameters(tiny_config, fmnist_data_dir, tmp_path):
    from cnnjax import trainer

    args = ["--config=tiny", f"--config.data.data_dir={fmnist_data_dir}", "--config.num_epochs=3"]
    killed = tmp_path / "killed"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "cnnjax.train", *args, f"--workdir={killed}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    first_checkpoint = killed / "checkpoints" / "16"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_checkpoint.exists()
    assert run_cli("cnnjax.train", *args, f"--workdir={killed}", cwd=tmp_path).returncode == 0

    # The reference runs in a subprocess too: the same XLA flags compile the same programs.
    straight = tmp_path / "straight"
    assert run_cli("cnnjax.train", *args, f"--workdir={straight}", cwd=tmp_path).returncode == 0
    config = tiny_config.copy_and_resolve_references()
    config.num_epochs = 3
    restored = []
    for workdir in (killed, straight):
        run = trainer.setup(config, workdir)
        model = trainer.build_model(config, 10)
        tx, _ = trainer.optim.create_optimizer(config, run.steps_per_epoch)
        state, meta = trainer.restore(run, checkpoint.manager(workdir, read_only=True), model, tx)
        assert meta["epoch"] == 3
        restored.append(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, *restored)
