"""SIGTERM and SIGINT during training: stop at the next step boundary, save, exit 128 + signum.

The handlers only record the signal (``listening``); the trainer polls ``stop_signal`` after
each step, a host-side list lookup with no device round trip, and then writes the preemption
checkpoint (``checkpoint.save_preempted``) and raises ``Preempted``, which the process harness
(``cli.run``) turns into one line on stderr and exit status 143 (SIGTERM) or 130 (SIGINT).
Before the first step and during evaluation ``check`` raises ``Interrupted`` instead (nothing
is lost by stopping there). A second signal while saving is recorded and ignored, so the save
completes; a SIGKILL then leaves only Orbax's temporary directory, which is never restored.

Multi-process runs (``jax.distributed`` initialised) must stop at the same step on every
process, since every step and every save is a collective. With JAX's preemption sync manager
(``jax_enable_preemption_service``, on by default) SIGTERM is left to JAX's own handler, which
tells the coordination service; ``multihost_utils.reached_preemption_sync_point(step)`` then
agrees on a step in the background and returns True on every process at that step (no
collective per step while no signal came). A SIGINT is passed on to that handler as SIGTERM
from the loop (not from the handler). Without the sync manager every process stops after the
next epoch checkpoint instead (one all-gather per epoch), and start-up and evaluation are not
interrupted.
"""

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []  # the signals received while listening, in order
_forwarded: list[int] = []  # the SIGINT passed on to JAX's SIGTERM handler (multi-process)


class Preempted(Exception):  # noqa: N818  (not an error: the process stops as asked)
    """Training stopped for ``signum``; ``str()`` is the one line for stderr."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class Interrupted(Exception):  # noqa: N818
    """A signal came where there is nothing to save (start-up, evaluation)."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"{name(signum)} during {where}")
        self.signum, self.where = signum, where


def name(signum: int) -> str:
    return signal.Signals(signum).name


def _record(signum, frame) -> None:
    _received.append(signum)  # nothing else: the loop acts on it between steps


def multi_process() -> bool:
    return jax.process_count() > 1


def sync_manager():
    """JAX's preemption sync manager, or None (single process, or the service is off)."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


@contextlib.contextmanager
def listening():
    """Records SIGTERM and SIGINT for the block instead of dying (main thread only; SIGTERM
    stays JAX's when its preemption sync manager has it); the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = [s for s in SIGNALS if s != signal.SIGTERM or sync_manager() is None]
    previous = {s: signal.signal(s, _record) for s in ours}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()
        _forwarded.clear()


def received() -> int | None:
    """The first signal received while listening, or None."""
    return _received[0] if _received else None


def check(where: str) -> None:
    """Raises ``Interrupted`` if a signal came (single process only: in a multi-process run one
    process stopping alone would leave the others waiting in a collective)."""
    if not multi_process() and received() is not None:
        raise Interrupted(received(), where)


def interruptible(batches, where: str = "evaluation"):
    """``batches``, with ``check(where)`` before each."""
    for batch in batches:
        check(where)
        yield batch


def stop_signal(step: int) -> int | None:
    """After global step ``step``: the signal to stop for, or None. Every process of a
    multi-process run returns a signal at the same step."""
    if not multi_process():
        return received()
    if sync_manager() is None:
        return None  # epoch_stop_signal decides at the epoch boundary
    if received() == signal.SIGINT and not _forwarded:
        _forwarded.append(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which tells the others
    if multihost_utils.reached_preemption_sync_point(step):
        return received() or signal.SIGTERM
    return None


def epoch_stop_signal() -> int | None:
    """At an epoch boundary, after its checkpoint: the signal to stop for, or None (multi-process
    without the sync manager: the first signal any process received, agreed by an all-gather)."""
    if not multi_process():
        return received()
    if sync_manager() is not None:
        return None  # stop_signal decides at a step
    seen = multihost_utils.process_allgather(np.int32(received() or 0))
    return int(np.max(seen)) or None
