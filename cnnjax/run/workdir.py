"""One trainer per run directory, and a full or unwritable disk as one line.

``lock(workdir)`` holds an exclusive ``fcntl.flock`` on ``WORKDIR/train.lock`` while a run
trains (process 0 of a multi-process run only: the others share its workdir). A second trainer
on the same workdir is refused before it writes anything, naming the pid that holds it. The
kernel releases a flock when its process dies, so a killed run never leaves the workdir locked;
the file stays (deleting it would let a later trainer lock a new file while a live one holds the
old). Evaluation and prediction take no lock: Orbax commits a checkpoint by renaming a complete
temporary directory, so a reader only ever lists complete ones.

``disk_errors(workdir)`` turns an ``OSError`` of a full disk (ENOSPC, EDQUOT) or of an
unwritable place (EROFS, EACCES) raised while training, including the ones Orbax's background
threads raise while saving a checkpoint (TensorStore reports them as ``ValueError`` carrying
``os_error_code``), into one ``DiskError`` line naming what was being written and the
checkpoint a rerun resumes from. Every other error passes through unchanged.
"""

import contextlib
import errno
import fcntl
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from cnnjax.errors import CnnjaxError

LOCK_FILE = "train.lock"
PROBE_PREFIX = ".cnnjax-write-probe-"

# The errno values that are the disk's or the filesystem's fault, not the program's.
REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
_FULL = (errno.ENOSPC, errno.EDQUOT)
# TensorStore's status text: ... local file "PATH": ... [os_error_code='28']
_TS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_PATH = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')
_CHECKPOINT = re.compile(r"/checkpoints/(\d+)(?:\.orbax-checkpoint-tmp[^/]*)?(?:/|$)")


class WorkdirBusyError(CnnjaxError):
    """Another live process is training in the workdir."""


class DiskError(CnnjaxError):
    """The disk is full or the path unwritable; what was committed before is kept."""


# ------------------------------------------------------------------------------------ lock


def holder(fd: int) -> str:
    """Who holds the flock on the open file ``fd``: ``"pid N"`` from the kernel's table of
    locks (``/proc/locks``, Linux), else ``"another process"`` (another system, or a holder on
    another machine of a network filesystem)."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for entry in table:
        fields = entry.split()  # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return f"pid {fields[4]}"
    return "another process"


@contextlib.contextmanager
def lock(workdir, enabled: bool = True):
    """Holds ``WORKDIR/train.lock`` exclusively for the ``with`` block (nothing if not
    ``enabled``).

    Nothing is written: the file is created empty when missing and never changed (the holder's
    pid comes from the kernel), so a refused process leaves the workdir as it found it.

    Raises:
      WorkdirBusyError: another process holds it.
      DiskError: the lock file cannot be created.
    """
    if not enabled:
        yield
        return
    path = Path(workdir) / LOCK_FILE
    try:
        # Read-write, though nothing is written: NFS grants an exclusive lock only so.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DiskError(f"--workdir={workdir} is not writable: {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"--workdir={workdir} is in use: {holder(fd)} is training in it "
                f"(it holds {path}); wait for it to finish or use another --workdir"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the flock


# ------------------------------------------------------------------------------ writability


def probe_writable(directory) -> None:
    """Creates and removes a file in ``directory``: ``os.access`` says yes to root on a
    directory it cannot write (a read-only mount) and knows nothing of quotas.

    Raises:
      OSError: the file cannot be created or removed.
    """
    path = Path(directory) / f"{PROBE_PREFIX}{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.close(fd)
    finally:
        path.unlink()


# ------------------------------------------------------------------------------ disk errors


def _chain(error: BaseException | None):
    """``error`` and its causes and contexts, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_error(error: BaseException) -> tuple[int, str | None, bool] | None:
    """``(errno, path, in_orbax)`` of the first full-disk or unwritable-path error in
    ``error``'s chain, or None when the chain has none. ``path`` is the first path any error of
    the chain names (None if none does); ``in_orbax``: the error was raised inside Orbax (a
    checkpoint save)."""
    found = [(e, *_errno_of(e)) for e in _chain(error)]
    codes = [(e, code) for e, code, _ in found if code in REASONS]
    if not codes:
        return None
    first, code = codes[0]
    path = next((p for _, _, p in found if p), None)
    frames = traceback.extract_tb(first.__traceback__)
    return code, path, any(f"{os.sep}orbax{os.sep}" in f.filename for f in frames)


def _errno_of(error: BaseException) -> tuple[int | None, str | None]:
    if isinstance(error, OSError):
        return error.errno, error.filename and str(error.filename)
    if isinstance(error, ValueError):  # TensorStore's write errors
        text = str(error)
        code, path = _TS_CODE.search(text), _TS_PATH.search(text)
        return (int(code.group(1)) if code else None), (path.group(1) if path else None)
    return None, None


def checkpoint_steps(workdir) -> tuple[list[int], list[int]]:
    """``(committed, in_flight)``: steps of the complete checkpoints on disk (renamed by their
    commit) and of the temporary directories of saves not committed."""
    directory = Path(workdir) / "checkpoints"
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return [], []
    committed = sorted(int(n) for n in names if n.isdigit())
    temporary = (n.partition(".")[0] for n in names if ".orbax-checkpoint-tmp" in n)
    return committed, sorted(int(n) for n in temporary if n.isdigit() and int(n) not in committed)


def message(workdir, code: int, path: str | None, in_orbax: bool = False) -> str:
    """The one line for ``code`` hit while writing ``path`` (a checkpoint when ``in_orbax``)
    during a run in ``workdir``."""
    workdir = Path(workdir)
    committed, in_flight = checkpoint_steps(workdir)
    match = _CHECKPOINT.search(path or "")
    if match or in_orbax:
        step = int(match.group(1)) if match else (in_flight[-1] if in_flight else None)
        committed = [s for s in committed if s != step]
        which = "a checkpoint" if step is None else f"checkpoint {step}"
        what = f"saving {which} in {workdir / 'checkpoints'}"
    else:
        what = f"writing {path or 'into ' + str(workdir)}"
    resume = (
        f"it resumes from checkpoint {committed[-1]}, which is intact"
        if committed
        else "it starts over (no checkpoint was committed yet)"
    )
    fix = "free space on that disk" if code in _FULL else f"make {workdir} writable"
    return f"{REASONS[code]} while {what}; {fix} and run the same command again: {resume}"


class _DropDiskErrors(logging.Filter):
    """Drops the log records of full-disk and unwritable-path errors: Orbax's background threads
    log each failed write with its traceback, and asyncio each failed future it dropped, besides
    the error that reaches the caller, which ``disk_errors`` reports on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and disk_error(exc) is not None:
            return False
        return _errno_of(ValueError(record.getMessage()))[0] not in REASONS


@contextlib.contextmanager
def writing(path):
    """Names ``path`` in an ``OSError`` of the ``with`` block that names no file (a failed
    ``write`` or ``close`` does not), so ``disk_errors`` can say what was being written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """A file for ``path``'s new content: a temporary file beside it, flushed to disk and
    renamed into place when the block ends without an error, removed when it raises. A reader
    (another process of the run, evaluate during training) or a kill never sees ``path`` half
    written. A failed write, flush or fsync, or the temporary file's creation, is an ``OSError``
    naming ``path`` (``writing``)."""
    path = Path(path)
    with writing(path):
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a run's files are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` through ``atomic_file``."""
    with atomic_file(path) as f:
        f.write(text)


_DROP = _DropDiskErrors()
_LOGGERS = ("absl", "asyncio")
_DRAIN_S = 60.0  # how long a failed save's other threads get to finish


def _settle_failed_save() -> None:
    """Lets the other threads of a failed Orbax save finish before the process ends: Orbax
    raises the first thread's error while the others still write (and would log the same
    failure again at interpreter shutdown)."""
    deadline = time.monotonic() + _DRAIN_S
    for thread in threading.enumerate():
        if (
            type(thread).__module__.startswith("orbax.")
            and thread is not threading.current_thread()
        ):
            # The base join: Orbax's own re-raises the thread's error, reported already.
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


def _closed_loop_noise(unraisable) -> bool:
    """TensorStore completing the writes of a failed save after Orbax closed that save's event
    loop: Python reports each as an unraisable "Event loop is closed" error. The failure itself
    reaches the caller as an error of its own (at the next save or the final wait)."""
    value = unraisable.exc_value
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


class _Quiet:
    """The filters ``disk_errors`` installs: disk-error log records and closed-loop noise."""

    def __init__(self):
        self.previous = None

    def hook(self, unraisable) -> None:
        if not _closed_loop_noise(unraisable):
            (self.previous or sys.__unraisablehook__)(unraisable)

    def install(self) -> None:
        for name in _LOGGERS:
            logging.getLogger(name).addFilter(_DROP)
        self.previous, sys.unraisablehook = sys.unraisablehook, self.hook

    def remove(self) -> None:
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(_DROP)
        if sys.unraisablehook == self.hook:
            sys.unraisablehook = self.previous


@contextlib.contextmanager
def disk_errors(workdir):
    """Re-raises a full-disk or unwritable-path error of the ``with`` block as one
    ``DiskError`` line (see the module docstring); lets every other error through.

    While it runs, and after a reported error for good (the process is about to end with the
    one line), the log records of disk errors and the "Event loop is closed" reports that a
    failed Orbax save leaves behind are dropped: they repeat or follow the error that is raised.
    """
    quiet, reported = _Quiet(), False
    quiet.install()
    try:
        yield
    except CnnjaxError:
        raise
    except Exception as e:
        found = disk_error(e)
        if found is None:
            raise
        reported = True
        if found[2]:
            _settle_failed_save()
        raise DiskError(message(workdir, *found)) from e
    finally:
        if not reported:
            quiet.remove()
