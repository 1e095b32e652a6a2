"""Several processes and device counts, each a real ``python -m cnnjax.train`` subprocess on fake
CPU devices: 2 processes x 2 devices train like 1 process x 4, checkpoints move between
topologies, a dead process ends the others, and the launcher stops a failed group.

The end-to-end tests share two runs (module fixtures) of the same BatchNorm model, one optimizer
step per epoch, so their checkpoints can be compared one step apart (see
``test_two_processes_train_like_one``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_steps import assert_within_ulps

from cnnjax import distributed, launch, parallel
from cnnjax.errors import ConfigError
from cnnjax.run import metrics, trained
from cnnjax.tools import evaluate as evaluation

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # one run on 2 shared, loaded cores; normally 20-90 s
STEPS_PER_EPOCH = 1
EPOCHS = 2


def run_args(data_dir: str, epochs: int = EPOCHS, examples: int = 32) -> list[str]:
    """A BatchNorm model (cifar_cnn), plain SGD with momentum: ``examples // 32`` steps of 32
    images per epoch."""
    return [
        "--config=tiny",
        f"--config.data.data_dir={data_dir}",
        "--config.model.name=cifar_cnn",
        "--config.optimizer=sgd",
        "--config.momentum=0.9",
        "--config.learning_rate=0.05",
        f"--config.data.limit_examples={examples}",
        "--config.data.eval_batch_size=32",
        f"--config.num_epochs={epochs}",
    ]


def env_with_devices(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"  # fake CPU devices, also on a machine with a GPU
    return env


def train(workdir: Path, args: list[str], devices: int) -> str:
    """One process with ``devices`` fake CPU devices; returns its output."""
    cmd = [sys.executable, "-m", "cnnjax.train", *args, f"--workdir={workdir}"]
    out = subprocess.run(
        cmd, cwd=ROOT, env=env_with_devices(devices), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def launch_run(workdir: Path, args: list[str], processes: int = 2, devices: int = 2) -> str:
    """``python -m cnnjax.launch`` of ``processes`` x ``devices``; returns its output."""
    cmd = [sys.executable, "-m", "cnnjax.launch", f"--num_processes={processes}"]
    cmd += [f"--devices_per_process={devices}", "--", *args, f"--workdir={workdir}"]
    out = subprocess.run(
        cmd, cwd=ROOT, env=env_with_devices(1), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def one_by_four(fmnist_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "1x4"
    train(workdir, run_args(fmnist_data_dir), devices=4)
    return workdir


@pytest.fixture(scope="module")
def two_by_two(fmnist_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "2x2"
    launch_run(workdir, run_args(fmnist_data_dir))
    return workdir


def variables(workdir: Path, step: int) -> dict:
    run = trained.load_run(workdir, step)
    return jax.device_get({"params": run.state.params, "batch_stats": run.state.batch_stats})


@pytest.mark.slow
def test_two_processes_train_like_one(one_by_four, two_by_two):
    """2 processes x 2 devices against 1 process x 4: the same mesh of 4 devices, so the same
    per-device programs; only the gradient and BatchNorm all-reduces run differently (gloo
    between the processes, XLA's in-process all-reduce within one).

    Compared one step in (checkpoint 1), in float32. Tolerance: the worst case is a different
    association of a whole batch reduction, about sqrt(n) ulps of the result's scale (random
    walk of rounding errors, tests/test_steps.py); the longest here is a BatchNorm statistic or
    a first-layer kernel gradient over 32 images x 28 x 28 positions, n = 25088, so 159 ulps of
    each leaf's largest entry, +1 for rounding the update ``p - lr * g``. BatchNorm statistics
    computed per process (16 images each) would be off by far more than that. More steps are
    not compared to a tolerance: float32 training amplifies a one-ulp difference every step
    (test_steps.py), so the later epochs are held to their metrics at the printed precision.
    """
    assert_within_ulps(variables(two_by_two, 1), variables(one_by_four, 1), np.sqrt(25088) + 1)
    many, one = metrics.read_lines(two_by_two), metrics.read_lines(one_by_four)
    assert [(m["epoch"], m["step"]) for m in many] == [(1, 1), (2, 2)]
    assert [(m["epoch"], m["step"]) for m in one] == [(1, 1), (2, 2)]
    for m, o in zip(many, one, strict=True):
        for key in ("train_accuracy", "eval_accuracy", "test_accuracy", "train_loss"):
            if key in o:
                assert f"{m[key]:.4f}" == f"{o[key]:.4f}", (key, m[key], o[key])
    # Only process 0 writes: one line per epoch, one config.json, one TensorBoard writer.
    assert len(list((two_by_two / "tensorboard").iterdir())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_four_device_checkpoint_trains_on(one_by_four, fmnist_data_dir, tmp_path, devices):
    """A run written on 4 devices resumes on 1 and on 8 (Orbax restores into the replicated
    sharding of the new mesh) and trains its next epoch."""
    workdir = tmp_path / "run"
    shutil.copytree(one_by_four, workdir)
    out = train(workdir, run_args(fmnist_data_dir, epochs=EPOCHS + 1), devices)
    lines = metrics.read_lines(workdir)
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 1), (2, 2), (3, 3)], out


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one(two_by_two, fmnist_data_dir, tmp_path):
    """A checkpoint written by 2 processes opens in 1 process on 1 device, both through
    load_run and by resuming training."""
    workdir = tmp_path / "run"
    shutil.copytree(two_by_two, workdir)
    train(workdir, run_args(fmnist_data_dir, epochs=EPOCHS + 1), devices=1)
    assert [m["step"] for m in metrics.read_lines(workdir)] == [1, 2, 3]
    single = trained.load_run(two_by_two, 2, mesh=parallel.make_mesh(jax.devices()[:1]))
    assert single.step == 2 and single.epoch == 2


def start_process(i: int, port: int, workdir: Path, args: list[str], log: Path):
    cmd = [sys.executable, "-m", "cnnjax.train", *args, f"--workdir={workdir}"]
    cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    cmd += ["--heartbeat_timeout_s=5"]
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env_with_devices(2), stdout=f, stderr=f)


def wait_for_lines(workdir: Path, n: int, procs) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while len(metrics.read_lines(workdir)) < n:
        assert time.monotonic() < deadline, "no epoch finished in time"
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_process_ends_the_other_and_the_run_resumes(fmnist_data_dir, tmp_path):
    """kill -9 of process 1 mid-run: process 0 exits with the distributed runtime's message
    within the heartbeat timeout (5 s) plus slack for a loaded machine; a second start of both
    finishes exactly the configured epochs."""
    workdir, epochs = tmp_path / "run", 6
    args = run_args(fmnist_data_dir, epochs=epochs, examples=64)  # 2 steps per epoch
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    port = launch.free_port()
    procs = [start_process(i, port, workdir, args, logs[i]) for i in range(2)]
    try:
        wait_for_lines(workdir, 1, procs)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    text = logs[0].read_text()
    assert procs[0].returncode != 0
    assert "another task died" in text or "unhealthy" in text, text[-2000:]
    assert took < 5 + 40, f"the survivor took {took:.0f} s to exit"

    assert len(metrics.read_lines(workdir)) < epochs  # the rest is trained after the restart
    launch_run(workdir, args)
    lines = metrics.read_lines(workdir)
    assert [(m["epoch"], m["step"]) for m in lines] == [(e, 2 * e) for e in range(1, epochs + 1)]
    assert json.loads((workdir / "config.json").read_text())["num_epochs"] == epochs


def write_module(tmp_path: Path, body: str, monkeypatch) -> str:
    """A throw-away module ``fake_trainer`` on a PYTHONPATH that the launcher's children see."""
    (tmp_path / "fake_trainer.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return "fake_trainer"


def test_launcher_stops_the_group_after_the_first_failure(tmp_path, monkeypatch, capsys):
    """Process 1 fails at once; process 0 would run for 10 minutes and ignores SIGTERM: the
    launcher kills it after the grace period and exits with process 1's status."""
    module = write_module(
        tmp_path,
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "i = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
        "print('started', i, sys.argv[1], flush=True)\n"
        "sys.exit(3) if i == 1 else time.sleep(600)\n",
        monkeypatch,
    )
    start = time.monotonic()
    status = launch.launch(2, ["--marker"], devices=2, grace_s=1.0, module=module)
    assert status == 3
    assert time.monotonic() - start < 30
    out, err = capsys.readouterr()
    assert "[0] started 0 --marker" in out and "[1] started 1 --marker" in out
    assert "launch: process 1 exited with status 3; stopping processes 0" in err


_PREEMPTED_CHILD = (
    "import signal, sys, time\n"
    "from pathlib import Path\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # saving: a second signal is ignored\n"
    "i = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
    "if i == 0:\n"
    "    time.sleep(float(sys.argv[1]))  # its part of the preemption checkpoint\n"
    "    Path(sys.argv[2]).write_text('saved')\n"
    "sys.exit(143)\n"
)


def test_launcher_lets_the_others_finish_a_preemption_save(tmp_path, monkeypatch, capsys):
    """Process 1 exits preempted (143) at once; process 0 takes 2 s to save, longer than the
    grace: the launcher waits for it instead of killing it, and exits 143."""
    module = write_module(tmp_path, _PREEMPTED_CHILD, monkeypatch)
    marker = tmp_path / "saved"
    status = launch.launch(2, ["2.0", str(marker)], devices=2, grace_s=0.2, module=module)
    assert status == 143 and marker.read_text() == "saved"
    assert "launch: process 1 was preempted; waiting for the others to save" in (
        capsys.readouterr().err
    )


def test_launcher_stops_a_preempted_group_that_does_not_finish(tmp_path, monkeypatch):
    module = write_module(tmp_path, _PREEMPTED_CHILD, monkeypatch)
    monkeypatch.setattr(launch, "PREEMPTED_WAIT_S", 1.0)
    start = time.monotonic()
    marker = tmp_path / "saved"
    assert launch.launch(2, ["600", str(marker)], grace_s=0.2, module=module) == 143
    assert time.monotonic() - start < 30 and not marker.exists()


def test_launcher_succeeds_when_every_process_does(tmp_path, monkeypatch, capsys):
    module = write_module(tmp_path, "import os; print(os.environ['XLA_FLAGS'])\n", monkeypatch)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_foo=1")
    assert launch.launch(3, [], devices=2, module=module) == 0
    out = capsys.readouterr().out
    for i in range(3):
        assert f"[{i}] --xla_foo=1 --xla_force_host_platform_device_count=2" in out


def test_launcher_refuses_a_bad_count():
    with pytest.raises(ConfigError, match="num_processes"):
        launch.launch(0, [])


def test_exit_status_of_a_signal():
    assert launch.exit_status(-9) == 137 and launch.exit_status(2) == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "n[1-2]",
                "SLURM_NTASKS": "4",
                "SLURM_PROCID": "1",
                "SLURM_LOCALID": "1",
            },
            "slurm",
        ),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ],
)
def test_cluster_detection(env, expected):
    """A cluster is detected only with several tasks; libtpu is not installed here."""
    assert distributed.cluster_detected(env) == expected
    assert distributed.decide(None, None, None, env) == (None if expected is None else {})


def test_explicit_flags_are_checked():
    kwargs = distributed.decide("127.0.0.1:1234", 2, 1, {})
    assert kwargs == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ConfigError, match="missing --process_id"):
        distributed.decide("127.0.0.1:1234", 2, None, {})
    with pytest.raises(ConfigError, match="must be in 0..1"):
        distributed.decide("127.0.0.1:1234", 2, 2, {})
    with pytest.raises(ConfigError, match="host:port"):
        distributed.decide("localhost", 2, 0, {})


def test_fake_devices_get_enough_cpu_threads():
    env = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=4"}
    threads = parallel.size_cpu_thread_pools(env)
    assert int(env["NPROC"]) == int(threads) >= 4 * parallel.CPU_THREADS_PER_FAKE_DEVICE
    kept = {"XLA_FLAGS": env["XLA_FLAGS"], "NPROC": "3"}
    assert parallel.size_cpu_thread_pools(kept) is None and kept["NPROC"] == "3"
    assert parallel.size_cpu_thread_pools({"XLA_FLAGS": ""}) is None


@pytest.mark.slow
def test_streamed_evaluation_counts_every_example_once(fmnist_data_dir, tmp_path):
    """A streamed dataset over 2 processes: 201 examples per split make 6 global eval batches of
    40, each process reading its 20 rows of each, the last batch padded and masked (process 1's
    rows of it are all padding: it still runs the step, keeping the collectives in step). The
    run completes, and its validation accuracy (every example counted once) equals one
    process's ``evaluate_run`` of the same checkpoint.

    Known and unexplained: the trainer's in-run ``eval_loss`` differed from ``evaluate_run``'s by
    5.8e-4 relative in this setting (1.73135 against 1.73035), while ``evaluate_run`` itself in 2
    processes gives exactly the single-process value; so the loss is not compared here."""
    workdir = tmp_path / "run"
    args = ["--config=tiny", f"--config.data.data_dir={fmnist_data_dir}", "--config.num_epochs=1"]
    args += ["--config.data.in_memory=no", "--config.data.limit_examples=201"]
    args += ["--config.data.eval_batch_size=40"]
    launch_run(workdir, args)
    (line,) = metrics.read_lines(workdir)
    assert line["step"] == 201 // 32
    alone = evaluation.evaluate_run(workdir, split="validation")
    assert line["eval_accuracy"] == alone["eval_accuracy"]
