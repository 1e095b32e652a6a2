"""A run SIGKILLed mid-epoch, during an asynchronous checkpoint save and during evaluation, and
started again with the same command each time, ends bit for bit where an uninterrupted run ends:
the whole train state (params, BatchNorm statistics, optimizer state, EMA, ReduceLROnPlateau
state, step) of every kept checkpoint, and every metrics.jsonl value but the timings.

The kills are placed by ``tests/kill_points/sitecustomize.py``, which makes the process wait at
the chosen point (it computes nothing differently); the test then checks from outside that the
kill landed mid-run: exit status -9, the files on disk in the state that phase leaves them, and
the latest committed checkpoint before the final step.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnjax.run import checkpoint

REPO = Path(__file__).resolve().parents[1]
KILL_POINTS = Path(__file__).resolve().parent / "kill_points"

STEPS_PER_EPOCH = 8  # limit_examples 256 / batch_size 32
EPOCHS = 3
FINAL_STEP = EPOCHS * STEPS_PER_EPOCH
# Everything that makes a resume hard at once: BatchNorm statistics, dropout (cifar_cnn), random
# augmentation, an EMA, the plateau state, one-cycle SGD with Nesterov momentum and weight decay.
RECIPE = [
    "--config=fashion_mnist_best",
    "--config.model=cifar_cnn",
    "--config.model.widths=(4, 8, 8)",
    f"--config.num_epochs={EPOCHS}",
    "--config.batch_size=32",
    "--config.warmup_epochs=1",
    "--config.schedule=onecycle",
    "--config.augment=crop(pad=2),flip",
    "--config.ema_decay=0.9",
    "--config.plateau.patience=1",
    "--config.log_every_steps=3",  # progress logs at steps 3, 6, 11, 14, 19, 22
    "--config.data.limit_examples=256",
    "--config.data.eval_batch_size=128",
]
# The environment variables of kill_points/sitecustomize.py that env() sets.
HOOK_VARS = ("CNNJAX_PAUSE", "CNNJAX_PAUSE_UNTIL", "CNNJAX_SIGNAL_AT_STEP", "CNNJAX_SIGNAL_PROCESS")
TIMING_KEYS = {"wall_s", "train_images_per_sec"}
STATE_KEYS = {"step", "params", "opt_state", "batch_stats", "ema_params", "plateau"}


def train_cmd(data_dir, workdir, *extra: str) -> list[str]:
    data = f"--config.data.data_dir={data_dir}"
    return [sys.executable, "-m", "cnnjax.train", *RECIPE, *extra, data, f"--workdir={workdir}"]


def env(pause: str | None = None, marker: Path | None = None, **hooks: str) -> dict:
    # One CPU device (the 4 fake devices of conftest only slow a subprocess down), this
    # checkout's cnnjax rather than an installed one, and the pause hooks. The compilation cache
    # is the user's (cnnjax's default): with a fresh one each time the five processes spent
    # over twice as long compiling.
    e = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    e["PYTHONPATH"] = os.pathsep.join([str(KILL_POINTS), str(REPO), e.get("PYTHONPATH", "")])
    for name in HOOK_VARS:
        e.pop(name, None)
    if pause:
        e |= {"CNNJAX_PAUSE": pause, "CNNJAX_PAUSE_MARKER": str(marker)}
    # until="signal", signal_at_step="N", signal_process="I": CNNJAX_PAUSE_UNTIL, ...
    e |= {f"CNNJAX_{'PAUSE_' if k == 'until' else ''}{k.upper()}": v for k, v in hooks.items()}
    return e


def committed(workdir: Path) -> list[int]:
    """Steps of the committed checkpoints (Orbax writes into ``<step>.orbax-checkpoint-tmp*``
    and renames when done)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def metric_lines(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def start_paused(cmd, workdir: Path, pause: str, timeout: float = 300, **hooks: str):
    """Starts ``cmd`` paused at ``pause`` (and the other ``hooks`` of ``env``; see
    kill_points/sitecustomize.py) and returns ``(process, what the workdir held once it waited
    there, its stderr file)``."""
    marker = workdir.parent / f"{workdir.name}.{pause.replace(':', '_')}.json"
    marker.unlink(missing_ok=True)
    log = marker.with_suffix(".log")
    with log.open("w") as stderr:  # a file, not a pipe that could fill up and block the child
        proc = subprocess.Popen(
            cmd, cwd=workdir.parent, env=env(pause, marker, **hooks),
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not marker.exists():
        proc.kill()
        proc.wait()
        raise AssertionError(f"never paused at {pause}: {log.read_text()[-3000:]}")
    seen = json.loads(marker.read_text())
    seen |= {"committed": committed(workdir), "lines": len(metric_lines(workdir))}
    directory = workdir / "checkpoints"
    seen["entries"] = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    return proc, seen, log


def run_until_killed(cmd, workdir: Path, pause: str, timeout: float = 300, **hooks: str) -> dict:
    """Starts ``cmd`` paused at ``pause``, SIGKILLs it once it waits there and returns what the
    workdir held at that moment."""
    proc, seen, _ = start_paused(cmd, workdir, pause, timeout, **hooks)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    seen["returncode"] = proc.returncode
    return seen


def restore_all(workdir: Path) -> dict:
    """``{step: (state tree, meta)}`` of every checkpoint, restored as saved (no target)."""
    mngr = checkpoint.manager(workdir, read_only=True)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    out = {}
    for step in mngr.all_steps():
        restored = mngr.restore(step, args=args)
        out[step] = (jax.device_get(restored.state), restored.meta)
    mngr.close()
    return out


def without_timings(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in TIMING_KEYS}


def flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_bit_identical(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        assert value.dtype == fb[key].dtype, key
        np.testing.assert_array_equal(value, fb[key], err_msg=key, strict=True)


def assert_same_run(straight: Path, resumed: Path) -> dict:
    """Asserts that two finished runs of ``RECIPE`` kept the same checkpoints, bit for bit (the
    whole train state and meta), and the same metrics.jsonl but for the timings. Returns the
    first's ``restore_all``."""
    want, got = restore_all(straight), restore_all(resumed)
    assert FINAL_STEP in want and want.keys() == got.keys()
    for step, (state, meta) in want.items():
        assert set(state) == STATE_KEYS and int(state["step"]) == step
        assert state["ema_params"] and state["plateau"] and state["batch_stats"]
        assert_bit_identical(state, got[step][0])
        assert without_timings(meta) == without_timings(got[step][1]), step
    lines_a, lines_b = metric_lines(straight), metric_lines(resumed)
    assert [x["epoch"] for x in lines_a] == [x["epoch"] for x in lines_b] == [1, 2, 3]
    for a, b in zip(lines_a, lines_b, strict=True):
        assert a.keys() == b.keys() and a.keys() >= TIMING_KEYS
        assert without_timings(a) == without_timings(b)
    return want


def start_reference(data_dir, workdir: Path, *extra: str):
    """The uninterrupted run (``RECIPE`` + ``extra`` flags), started in the background (it runs
    alongside the interrupted ones: two processes on two cores); ``finish_reference`` waits for
    it."""
    log = workdir.with_suffix(".log").open("w")
    proc = subprocess.Popen(
        train_cmd(data_dir, workdir, *extra), cwd=workdir.parent, env=env(),
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    return proc, log


def finish_reference(reference, timeout: float = 600) -> None:
    proc, log = reference
    proc.wait(timeout=timeout)
    log.close()
    assert proc.returncode == 0, Path(log.name).read_text()[-3000:]


@pytest.mark.slow
def test_killed_three_times_resumes_bit_identically(fmnist_data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start_reference(fmnist_data_dir, straight)
    cmd = train_cmd(fmnist_data_dir, killed)

    # 1. Mid-epoch 2, at step 11, resuming from the committed step-8 checkpoint.
    mid = run_until_killed(cmd, killed, "step:11")
    assert mid["returncode"] == -signal.SIGKILL
    assert mid["committed"] == [8] and mid["lines"] == 1

    # 2. During the save of step 16 (from the resumed epoch 2): its files are written under the
    # temporary name, not committed. Epoch 2's line is in metrics.jsonl, and epoch 3's too when
    # the main thread, which trains on meanwhile, got that far: the restart drops both.
    save = run_until_killed(cmd, killed, "save:16")
    assert save["returncode"] == -signal.SIGKILL
    assert save["committed"] == [8] and save["lines"] in (2, 3)
    assert Path(save["tmp"]).name in save["entries"] and ".orbax-checkpoint-tmp" in save["tmp"]

    # 3. During epoch 3's evaluation (the second validation of a process resumed at epoch 2),
    # before its line, its test evaluation and its checkpoint.
    evaluation = run_until_killed(cmd, killed, "eval:2")
    assert evaluation["returncode"] == -signal.SIGKILL
    assert evaluation["committed"] == [8, 16] and evaluation["lines"] == 2
    for seen in (mid, save, evaluation):
        assert max(seen["committed"]) < FINAL_STEP

    # 4. The same command once more finishes the run.
    last = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-3000:]
    finish_reference(reference)

    want = assert_same_run(straight, killed)
    # Epoch 2's validation loss rose, so the plateau lowered the learning rate: its state matters.
    assert float(want[FINAL_STEP][0]["plateau"]["scale"]) < 1
    # The comparison can fail: two checkpoints of one run differ in every part.
    earlier = min(want)
    assert earlier < FINAL_STEP
    for part in STATE_KEYS - {"plateau"}:
        a, b = flat(want[earlier][0][part]), flat(want[FINAL_STEP][0][part])
        assert any(not np.array_equal(a[k], b[k]) for k in a), part
