"""Pause points for tests/test_resume.py, tests/test_preemption.py and
experiments/kill_anywhere.py, loaded by Python at start-up (as ``sitecustomize``) when this
directory is on ``PYTHONPATH``.

With ``CNNJAX_PAUSE=PHASE:N``, a ``python -m cnnjax.train`` process stops at one point, writes
the JSON file ``CNNJAX_PAUSE_MARKER`` and waits there to be SIGKILLed:

- ``step:N``: the progress log of global step N (mid-epoch when N is not a multiple of the
  steps per epoch).
- ``save:N``: the commit of checkpoint N, in Orbax's background thread: every file of it is
  written under a temporary name and not yet renamed, while the main thread trains on.
- ``preempted:N``: the commit of the preemption checkpoint of step N (``WORKDIR/preempted``),
  written under a temporary name and not yet renamed.
- ``setup:1``: the start of ``setup_lib.setup`` (start-up: config.json written, no data read yet).
- ``eval:N``: the N-th validation result of this process, before the epoch's metrics line, its
  test evaluation and its checkpoint.

``step`` and ``eval`` first wait for the checkpoint saves in flight to be committed, so what the
restart finds on disk does not depend on timing. The hooks only wait: nothing is computed
differently. Without ``CNNJAX_PAUSE`` nothing is patched.

With ``CNNJAX_SIGNAL_AT_STEP=N`` the process sends itself SIGTERM at the progress log of step N
(so, with ``CNNJAX_PAUSE=preempted:N``, a kill can land in the preemption save); with
``CNNJAX_SIGNAL_PROCESS=I`` too, only the process of ``--process_id=I`` does (a multi-process run
where one process is preempted).

With ``CNNJAX_PAUSE_UNTIL=signal`` the process waits at the point only until the trainer has
recorded a SIGTERM or SIGINT (``cnnjax.preemption``), then goes on, so a test can signal it at a
known point.
"""

import json
import os
import sys
import time
from pathlib import Path

_START = time.time()


def _pause(what: str, **details) -> None:
    """Writes the marker (atomically: the test polls for it) and sleeps until killed."""
    marker = Path(os.environ["CNNJAX_PAUSE_MARKER"])
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"phase": what, "pid": os.getpid(), **details}))
    tmp.rename(marker)
    if os.environ.get("CNNJAX_PAUSE_UNTIL") == "signal":
        from cnnjax import preemption

        while preemption.received() is None:
            time.sleep(0.005)
        return
    while True:
        time.sleep(60)


def _workdir() -> Path:
    flag = "--workdir="
    return Path(next(a for a in sys.argv if a.startswith(flag))[len(flag) :])


def _committed_steps() -> list[int]:
    """Once every checkpoint save of this process is committed (saves are asynchronous, so this
    makes the state on disk at the pause deterministic), the steps on disk. A temporary
    directory older than the process is the leftover of a killed one, not a save in flight."""
    directory = _workdir() / "checkpoints"
    empty_until = time.time() + 2  # an epoch-1 pause has nothing to wait for (an empty directory)
    while True:
        paths = list(directory.iterdir())
        in_flight = [
            p for p in paths if ".orbax-checkpoint-tmp" in p.name and p.stat().st_mtime >= _START
        ]
        if (paths or time.time() > empty_until) and not in_flight:
            return sorted(int(p.name) for p in paths if p.name.isdigit())
        time.sleep(0.01)


def _install(phase: str, n: int) -> None:
    if phase == "step":
        from cnnjax.run import metrics

        scalars = metrics.Writer.scalars

        def paused_scalars(self, step, values):
            if int(step) == n and "train_loss" in values and "eval_loss" not in values:
                _pause("step", step=n, committed=_committed_steps())
            return scalars(self, step, values)

        metrics.Writer.scalars = paused_scalars
    elif phase in ("save", "preempted"):
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        parent = "checkpoints" if phase == "save" else "preempted"

        async def paused_finalize(self):
            final = self.get_final()
            if final.name == str(n) and final.parent.name == parent:
                _pause(phase, step=n, tmp=str(self.get()))
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize
    elif phase == "eval":
        from cnnjax.run import metrics

        means, calls = metrics.means, []

        def paused_means(sums, prefix):
            result = means(sums, prefix)
            if prefix == "eval":
                calls.append(result)
                if len(calls) == n:
                    _pause("eval", call=n, committed=_committed_steps(), **result)
            return result

        metrics.means = paused_means
    elif phase == "setup":
        from cnnjax.train import setup as setup_lib

        setup = setup_lib.setup

        def paused_setup(config, workdir):
            _pause("setup")
            return setup(config, workdir)

        setup_lib.setup = paused_setup
    else:
        phases = "step, save, preempted, eval, setup"
        raise ValueError(f"CNNJAX_PAUSE: unknown phase {phase!r} ({phases})")


def _signal_at(n: int) -> None:
    import signal

    from cnnjax.run import metrics

    scalars = metrics.Writer.scalars

    def signalling_scalars(self, step, values):
        if int(step) == n and "train_loss" in values and "eval_loss" not in values:
            os.kill(os.getpid(), signal.SIGTERM)
        return scalars(self, step, values)

    metrics.Writer.scalars = signalling_scalars


_only = os.environ.get("CNNJAX_SIGNAL_PROCESS")
if os.environ.get("CNNJAX_SIGNAL_AT_STEP") and (not _only or f"--process_id={_only}" in sys.argv):
    _signal_at(int(os.environ["CNNJAX_SIGNAL_AT_STEP"]))
if os.environ.get("CNNJAX_PAUSE"):
    _phase, _, _n = os.environ["CNNJAX_PAUSE"].partition(":")
    _install(_phase, int(_n))
