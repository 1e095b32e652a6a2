"""cnnjax.run.workdir: one trainer per workdir (a flock the kernel drops with its process), an
unwritable workdir refused before any data is read, and a full disk (a real ENOSPC from a small
tmpfs, filled at a chosen point by ``tests/disk_points/sitecustomize.py``) stopping a run with
one line while its last committed checkpoint stays intact, restorable and resumable.

The tmpfs and read-only mounts need root with mount rights (a container without them skips
those tests); the other error paths inject the errno instead.
"""

import errno
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnjax.errors import CheckpointError
from cnnjax.run import checkpoint, trained
from cnnjax.run import workdir as workdir_lib
from cnnjax.tools import evaluate as evaluation
from cnnjax.train import loop
from cnnjax.train import setup as setup_lib

REPO = Path(__file__).resolve().parents[1]
KILL_POINTS = REPO / "tests" / "kill_points"
DISK_POINTS = REPO / "tests" / "disk_points"
STEPS_PER_EPOCH = 16  # tiny: 512 examples / batch 32


def env(points: Path | None = None, **extra) -> dict:
    """One CPU device, this checkout's cnnjax, and the hooks of ``points`` if given."""
    e = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **extra}
    paths = [str(points)] if points else []
    e["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), e.get("PYTHONPATH", "")])
    for name in ("CNNJAX_PAUSE", "CNNJAX_FILL"):
        if name not in extra:
            e.pop(name, None)
    return e


def train_cmd(data_dir, workdir) -> list[str]:
    return [sys.executable, "-m", "cnnjax.train", "--config=tiny",
            f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"]  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line(result, *fragments) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict:
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def stable_snapshot(directory: Path, timeout: float = 60) -> dict:
    """A snapshot that did not change for half a second (a live run's writes have settled)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = snapshot(directory)
        if now == last:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError(f"{directory} kept changing")


def mount(target: Path, options: str) -> None:
    """Mounts a tmpfs with ``options`` at ``target``; skips the test where mounting is not
    allowed."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.fixture
def mounts():
    """Mounts made with ``mount(path, options)``, unmounted after the test."""
    made = []

    def make(target: Path, options: str) -> Path:
        mount(target, options)
        made.append(target)
        return target

    yield make
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], check=False)


# ------------------------------------------------------------------------------------ lock


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    with workdir_lib.lock(tmp_path):
        assert (tmp_path / workdir_lib.LOCK_FILE).read_bytes() == b""  # the kernel knows the pid
        # flock belongs to an open file: a second open in the same process conflicts too.
        busy = pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()} is training")
        with busy, workdir_lib.lock(tmp_path):
            pass
        assert (tmp_path / workdir_lib.LOCK_FILE).read_bytes() == b""
    with workdir_lib.lock(tmp_path):  # released on exit
        pass
    with workdir_lib.lock(tmp_path, enabled=False), workdir_lib.lock(tmp_path):
        pass  # not enabled (processes > 0 of a multi-process run): takes nothing


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = (
        "import sys, time; from cnnjax.run import workdir as w\n"
        "with w.lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env(),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        busy = pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {proc.pid} is training")
        with busy, workdir_lib.lock(tmp_path):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with workdir_lib.lock(tmp_path):  # the kernel dropped the dead process's flock
        pass


# ----------------------------------------------------------------------------- writability


def refuse_before_setup(monkeypatch):
    """Makes reaching the data loading a test failure."""

    def setup(*_):
        raise AssertionError("training started: the workdir should have been refused")

    monkeypatch.setattr(setup_lib, "setup", setup)


def test_unwritable_workdirs_are_refused_before_training(tiny_config, tmp_path, monkeypatch):
    refuse_before_setup(monkeypatch)
    (tmp_path / "afile").write_text("")
    cases = {
        tmp_path / "afile": "afile is a file, not a directory",
        tmp_path / "afile" / "w": "afile/w cannot be created: ",
    }
    for workdir, fragment in cases.items():
        with pytest.raises(CheckpointError, match=fragment):
            loop.train_and_evaluate(tiny_config, workdir)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]

    # Permission denied (root is never denied: the errno is injected into the probe's open).
    real_open = os.open

    def denying_open(path, *args, **kwargs):
        if Path(path).name.startswith(workdir_lib.PROBE_PREFIX):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    with pytest.raises(CheckpointError, match=r"w is not writable: .*Permission denied"):
        loop.train_and_evaluate(tiny_config, tmp_path / "w")
    assert not any((tmp_path / "w").iterdir())


def test_read_only_workdir_is_refused_before_training(tiny_config, tmp_path, monkeypatch, mounts):
    refuse_before_setup(monkeypatch)
    ro = mounts(tmp_path / "ro", "ro,size=1m")
    with pytest.raises(CheckpointError, match=r"ro is not writable: .*Read-only file system"):
        loop.train_and_evaluate(tiny_config, ro)
    with pytest.raises(CheckpointError, match=r"ro/w cannot be created: .*Read-only file system"):
        loop.train_and_evaluate(tiny_config, ro / "w")
    assert not any(ro.iterdir())


def test_probe_creates_a_file_and_leaves_none(tmp_path):
    trained.check_workdir(tmp_path / "w")
    assert list((tmp_path / "w").iterdir()) == []


# ----------------------------------------------------------------------------- disk errors


def disk_error_of(workdir, error: BaseException) -> str:
    with pytest.raises(workdir_lib.DiskError) as info, workdir_lib.disk_errors(workdir):
        raise error
    assert info.value.__cause__ is error  # the traceback (CNNJAX_TRACEBACK=1) keeps the cause
    return str(info.value)


def test_disk_errors_become_one_line_and_other_errors_pass(tmp_path):
    (tmp_path / "checkpoints" / "16").mkdir(parents=True)
    (tmp_path / "checkpoints" / "32.orbax-checkpoint-tmp").mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert disk_error_of(tmp_path, full) == (
        f"no space left on device while writing {tmp_path}/metrics.jsonl; free space on that "
        "disk and run the same command again: it resumes from checkpoint 16, which is intact"
    )
    # TensorStore's error from an Orbax background thread, re-raised by wait_until_finished.
    ts = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "'
        f'{tmp_path}/checkpoints/32.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding": '
        "Failed to write 6184 bytes to file 7: No space left on device [os_error_code='28']"
    )
    assert disk_error_of(tmp_path, ts).startswith(
        f"no space left on device while saving checkpoint 32 in {tmp_path}/checkpoints; free "
        "space on that disk and run the same command again: it resumes from checkpoint 16"
    )
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert disk_error_of(tmp_path, quota).startswith(
        f"disk quota exceeded while writing into {tmp_path}"
    )
    ro = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "curves.png"))
    assert (
        f"read-only file system while writing {tmp_path}/curves.png; make {tmp_path} writable"
        in disk_error_of(tmp_path, ro)
    )
    # Not the disk's fault: bugs and other errors keep their type and traceback.
    for error in (FileNotFoundError(errno.ENOENT, "gone", "x"), ValueError("shapes differ"),
                  ValueError("NOT_FOUND [os_error_code='2']"), KeyError("params")):  # fmt: skip
        with pytest.raises(type(error)), workdir_lib.disk_errors(tmp_path):
            raise error


def test_writing_names_the_file_a_failed_write_does_not(tmp_path):
    with pytest.raises(OSError) as info, workdir_lib.writing(tmp_path / "metrics.jsonl"):
        raise OSError(errno.ENOSPC, "No space left on device")  # what f.write/close raise
    assert info.value.filename == str(tmp_path / "metrics.jsonl")
    assert info.value.errno == errno.ENOSPC


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), workdir_lib.atomic_file(path) as f:
        f.write("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    workdir_lib.write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]
    assert path.stat().st_mode & 0o777 == 0o644
    missing = tmp_path / "gone" / "dataset.json"  # the temporary file cannot be created
    with pytest.raises(FileNotFoundError) as info:
        workdir_lib.write_text_atomic(missing, "x")
    assert info.value.filename == str(missing)


def fill(path: Path) -> None:
    """Fills the disk of ``path`` with the hooks' own filler."""
    spec = importlib.util.spec_from_file_location("disk_points", DISK_POINTS / "sitecustomize.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    hooks.fill(path)


def test_full_disk_while_writing_metrics_names_metrics_jsonl(tmp_path, mounts):
    from cnnjax.run import metrics

    disk = mounts(tmp_path / "disk", "size=4m")
    (disk / "w").mkdir()
    writer = metrics.Writer(disk / "w")
    (disk / "filler").touch()
    fill(disk / "filler")
    with pytest.raises(workdir_lib.DiskError) as info, workdir_lib.disk_errors(disk / "w"):
        writer.epoch({"epoch": 1, "step": 16, "train_loss": 1.0})
    assert str(info.value).startswith(
        f"no space left on device while writing {disk}/w/metrics.jsonl; free space on that disk"
    )
    assert str(info.value).endswith("it starts over (no checkpoint was committed yet)")
    with pytest.raises(OSError, match="No space left"):
        writer.close()  # TensorBoard's buffered events cannot be flushed either
    writer.close()  # and are dropped: closing again (tensorboardX's exit hook) is a no-op


# -------------------------------------------------------------------------- end to end


def start_paused(cmd, workdir: Path, pause: str, timeout: float = 300):
    """Starts ``cmd`` with the kill point ``pause`` and returns ``(process, marker)`` once it
    waits there."""
    marker = workdir.parent / f"{workdir.name}.pause.json"
    log = (workdir.parent / f"{workdir.name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=workdir.parent, stdout=subprocess.DEVNULL, stderr=log,
                            env=env(KILL_POINTS, CNNJAX_PAUSE=pause,
                                    CNNJAX_PAUSE_MARKER=str(marker)))  # fmt: skip
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        proc.kill()
        proc.wait()
        raise AssertionError(f"never paused at {pause}: {Path(log.name).read_text()[-3000:]}")
    return proc, json.loads(marker.read_text())


@pytest.mark.slow
def test_a_live_run_refuses_a_second_trainer_and_serves_evaluate(fmnist_data_dir, tmp_path):
    workdir = tmp_path / "w"
    cmd = train_cmd(fmnist_data_dir, workdir)
    # Paused in the commit of checkpoint 32: checkpoint 16 is committed, 32 half written.
    live, seen = start_paused(cmd, workdir, f"save:{2 * STEPS_PER_EPOCH}")
    try:
        before = stable_snapshot(workdir)
        second = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert_one_line(second, f"--workdir={workdir} is in use: pid {live.pid} is training")
        assert snapshot(workdir) == before  # byte for byte: config.json was not rewritten

        evaluate = [sys.executable, "-m", "cnnjax.evaluate", f"--workdir={workdir}"]
        result = subprocess.run(evaluate, cwd=tmp_path, env=env(), capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "checkpoint step 16 (epoch 1), split test" in result.stdout
        assert live.poll() is None  # still training (waiting in its commit)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    assert seen["tmp"].endswith(".orbax-checkpoint-tmp")
    with workdir_lib.lock(workdir):  # SIGKILL released it
        pass


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_last_checkpoint(fmnist_data_dir, tmp_path, mounts):
    disk = mounts(tmp_path / "disk", "size=32m")
    workdir, filler, marker = disk / "w", disk / "filler", tmp_path / "fill.json"
    cmd = train_cmd(fmnist_data_dir, workdir)
    hooks = {"CNNJAX_FILL": f"save:{2 * STEPS_PER_EPOCH}", "CNNJAX_FILL_FILE": str(filler),
             "CNNJAX_FILL_MARKER": str(marker)}  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env(DISK_POINTS, **hooks), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert_one_line(
        result,
        f"error: no space left on device while saving checkpoint 32 in {workdir}/checkpoints; "
        "free space on that disk and run the same command again: it resumes from checkpoint 16, "
        "which is intact",
    )
    before = json.loads(marker.read_text())["hashes"]
    assert before and all(p.startswith("16/") for p in before)
    after = {f"16/{k}": v for k, v in snapshot(workdir / "checkpoints" / "16").items()}
    assert after == before  # the committed checkpoint is byte for byte what it was
    run = trained.load_run(workdir)
    assert (run.step, run.epoch) == (16, 1)
    assert evaluation.evaluate_run(workdir)["step"] == 16  # evaluates (the disk still full)

    filler.unlink()  # space is back: the same command resumes from 16 and finishes
    again = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    mngr = checkpoint.manager(workdir, read_only=True)
    assert mngr.all_steps() == [16, 32]
    mngr.close()
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]


@pytest.mark.slow
def test_full_disk_in_a_background_save_surfaces_at_the_next_save(
    fmnist_data_dir, tmp_path, mounts
):
    disk = mounts(tmp_path / "disk", "size=32m")
    workdir = disk / "w"
    hooks = {"CNNJAX_FILL": f"save:{STEPS_PER_EPOCH}", "CNNJAX_FILL_FILE": str(disk / "filler"),
             "CNNJAX_FILL_MARKER": str(tmp_path / "fill.json")}  # fmt: skip
    result = subprocess.run(train_cmd(fmnist_data_dir, workdir), cwd=tmp_path, capture_output=True,
                            env=env(DISK_POINTS, **hooks), text=True, timeout=300)  # fmt: skip
    # Checkpoint 16 fails in Orbax's threads while epoch 2 trains; the save of 32 reports it,
    # unless writing epoch 2's metrics.jsonl line or curves.png on the full disk fails first.
    line = assert_one_line(result, "it starts over (no checkpoint was committed yet)")
    saving = f"error: no space left on device while saving checkpoint 16 in {workdir}/checkpoints; "
    writing = f"error: no space left on device while writing {workdir}/"
    assert line.startswith((saving, writing)), line
    assert not (workdir / "checkpoints" / "16").exists()
