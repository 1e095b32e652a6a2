"""SIGTERM and SIGINT stop ``python -m cnnjax.train`` after the current step with a checkpoint
(exit status 143 / 130, one line on stderr), and the same command resumes mid-epoch to the bit
where an uninterrupted run ends; a SIGKILL during the preemption save leaves nothing that is
restored. The runs are ``test_resume``'s recipe, paused and signalled at known points by
``tests/kill_points/sitecustomize.py``.
"""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_resume import (
    assert_same_run,
    committed,
    env,
    finish_reference,
    metric_lines,
    run_until_killed,
    start_paused,
    start_reference,
    train_cmd,
)

from cnnjax import preemption
from cnnjax.run import checkpoint

# Signal to exit: the step in flight + the preemption save + closing the run and the interpreter
# (JAX, Orbax, TensorBoard). Measured (docs/reliability.md, "Preemption", 2 cores at load
# average 7-10): a step 75-200 ms, the save 0.2-0.3 s, signal to exit 3.4-7.0 s in all. 30 s is
# over 4 times the worst of those; a stop that waited for the rest of the epoch, an evaluation
# or a hang would exceed it.
EXIT_BOUND_S = 30.0


def test_handlers_only_record_and_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.listening():
        assert preemption.received() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert preemption.received() == signal.SIGTERM
        assert preemption.stop_signal(1) == signal.SIGTERM
        with pytest.raises(preemption.Interrupted, match="SIGTERM during evaluation"):
            list(preemption.interruptible(iter([1, 2])))
    assert signal.getsignal(signal.SIGTERM) is before and preemption.received() is None
    assert preemption.Preempted(signal.SIGTERM, "x").exit_status == 143
    assert preemption.Preempted(signal.SIGINT, "x").exit_status == 130


def signalled(cmd, workdir: Path, pause: str, signum: int) -> dict:
    """Runs ``cmd`` to ``pause``, sends ``signum`` there and returns the exit status, stderr,
    the seconds from the signal to the exit and the workdir's state after."""
    proc, seen, log = start_paused(cmd, workdir, pause, until="signal")
    start = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    seen |= {"returncode": proc.returncode, "exit_s": time.monotonic() - start}
    seen["stderr"] = log.read_text().strip().splitlines()
    seen |= {"after": committed(workdir), "preempted": checkpoint.preempted_step(workdir)}
    return seen


@pytest.mark.slow
def test_signals_stop_with_a_checkpoint_and_the_run_resumes_bit_identically(
    fmnist_data_dir, tmp_path
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = start_reference(fmnist_data_dir, straight)
    cmd = train_cmd(fmnist_data_dir, stopped)

    # 1. SIGTERM at step 11 (mid-epoch 2): the preemption checkpoint of step 11.
    mid = signalled(cmd, stopped, "step:11", signal.SIGTERM)
    assert mid["returncode"] == 143, mid["stderr"]
    assert len(mid["stderr"]) == 1 and "SIGTERM" in mid["stderr"][0]
    assert str(stopped / "preempted" / "11") in mid["stderr"][0]
    assert "the same command resumes" in mid["stderr"][0]
    assert mid["after"] == [8] and mid["preempted"] == 11 and len(metric_lines(stopped)) == 1
    assert mid["exit_s"] < EXIT_BOUND_S

    # 2. SIGTERM during start-up: nothing to save, nothing changed.
    files = {p: p.read_bytes() for p in stopped.glob("*.json*")}
    startup = signalled(cmd, stopped, "setup:1", signal.SIGTERM)
    assert startup["returncode"] == 143, startup["stderr"]
    assert len(startup["stderr"]) == 1 and "start-up" in startup["stderr"][0]
    assert startup["after"] == [8] and startup["preempted"] == 11
    assert {p: p.read_bytes() for p in stopped.glob("*.json*")} == files

    # 3. Resumed at step 11, SIGINT during the last epoch's evaluation (the second of this
    # process): its steps are done and kept, in the preemption checkpoint of step 24.
    late = signalled(cmd, stopped, "eval:2", signal.SIGINT)
    assert late["returncode"] == 130, late["stderr"]
    assert len(late["stderr"]) == 1 and "SIGINT" in late["stderr"][0]
    assert late["after"] == [8, 16] and late["preempted"] == 24
    assert late["exit_s"] < EXIT_BOUND_S

    # 4. The same command finishes the run and drops the preemption checkpoint.
    last = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-3000:]
    assert not (stopped / "preempted").exists()
    finish_reference(reference)
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_streamed_data_resumes_mid_epoch_bit_identically(fmnist_data_dir, tmp_path):
    """The streaming path: the resumed process starts epoch 2's Grain order at the batch after
    step 11, reading none of the batches trained before it."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    streamed = "--config.data.in_memory=no"
    reference = start_reference(fmnist_data_dir, straight, streamed)
    cmd = train_cmd(fmnist_data_dir, stopped, streamed)

    mid = signalled(cmd, stopped, "step:11", signal.SIGTERM)
    assert mid["returncode"] == 143, mid["stderr"]
    assert mid["after"] == [8] and mid["preempted"] == 11

    last = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-3000:]
    finish_reference(reference)
    assert_same_run(straight, stopped)


@pytest.mark.slow
def test_killed_in_the_preemption_save_and_anywhere_resumes_bit_identically(
    fmnist_data_dir, tmp_path
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start_reference(fmnist_data_dir, straight)
    cmd = train_cmd(fmnist_data_dir, killed)

    # 1. SIGTERM at step 11, SIGKILL while the preemption checkpoint is being committed: its
    # files are under Orbax's temporary name, which is never listed, so never restored.
    seen = run_until_killed(cmd, killed, "preempted:11", signal_at_step="11")
    assert seen["returncode"] == -signal.SIGKILL and seen["committed"] == [8]
    assert ".orbax-checkpoint-tmp" in Path(seen["tmp"]).name and Path(seen["tmp"]).exists()
    assert checkpoint.preempted_step(killed) is None

    # 2. A SIGKILL at a random moment (start-up, a step, a save or an evaluation).
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL)
    delay = random.uniform(0, 20)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), f"killed after {delay:.1f} s"

    # 3. The same command finishes the run.
    last = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert last.returncode == 0, f"killed after {delay:.1f} s: " + last.stderr[-3000:]
    finish_reference(reference)
    assert_same_run(straight, killed)
