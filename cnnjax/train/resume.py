"""Where a run starts and how it stops: a fresh state, the newest checkpoint (an epoch's or a
preemption's), the epoch checkpoint, and the preemption checkpoint written when a signal
stops training mid-epoch.
"""

import dataclasses
import time
from pathlib import Path

import jax

from cnnjax import parallel, preemption
from cnnjax.errors import CheckpointError
from cnnjax.run import checkpoint
from cnnjax.run.state import TrainState, abstract_train_state, create_train_state
from cnnjax.train import eval_steps, optim, transfer
from cnnjax.train.setup import Run


@dataclasses.dataclass(frozen=True)
class Position:
    """Where an epoch stopped for a signal: the next ``batch`` of ``epoch`` (0-based; ``batch``
    is ``steps_per_epoch`` when only the evaluation was left), with that epoch's metric sums."""

    epoch: int
    batch: int
    acc: dict


def initial_state(run: Run) -> TrainState:
    """A fresh TrainState (or one initialised from ``init_from``), replicated."""
    i = run.init
    state = create_train_state(run.model, run.tx, i.key, run.input_shape, **i.options)
    if i.init_from:
        state = transfer.load_pretrained(state, i.init_from)
    return jax.device_put(state, parallel.replicated(run.mesh))


def restore_target(run: Run, tx) -> TrainState:
    """The abstract TrainState a checkpoint restores into, replicated on the mesh (the
    optimizer ``tx`` fixes the structure of ``opt_state``, not its values)."""
    options = run.init.options
    target = abstract_train_state(run.model, tx, jax.random.key(0), run.input_shape, **options)
    return checkpoint.abstract_with_sharding(target, parallel.replicated(run.mesh))


def restore(run: Run, mngr, step: int | None = None):
    """The checkpointed ``(state, meta)`` at ``step`` (default: latest), replicated.

    A checkpoint written with ``skip_nonfinite`` set the other way (on or off) restores too: its
    optimizer state is unwrapped, or wrapped with no skips counted, so a diverged run can go on
    with ``--config.skip_nonfinite`` from its last good checkpoint.
    """
    try:
        state, meta = checkpoint.restore(mngr, restore_target(run, run.tx), step)
    except CheckpointError as error:
        try:
            state, meta = checkpoint.restore(mngr, restore_target(run, run.other_tx), step)
        except CheckpointError:
            raise error from None
    skip = bool(run.settings.skip_nonfinite)
    opt_state = optim.convert_skip_state(state.opt_state, skip)
    opt_state = jax.device_put(opt_state, parallel.replicated(run.mesh))
    return state.replace(tx=run.tx, opt_state=opt_state), meta


def restore_or_init(run: Run, mngr):
    """Resumes from the newest checkpoint: the preemption checkpoint when it is newer than the
    latest epoch checkpoint, else that. Returns ``(state, epochs_done, position)``, ``position``
    a ``Position`` in epoch ``epochs_done`` or None."""
    latest, preempted = mngr.latest_step(), checkpoint.preempted_step(run.workdir)
    if preempted is not None and latest is not None and preempted <= latest:
        checkpoint.discard_preempted(run.workdir)  # a kill came before it was deleted
    elif preempted is not None:
        acc = checkpoint.abstract_with_sharding(
            eval_steps.zero_sums(run.mesh, train=True), parallel.replicated(run.mesh)
        )
        target = restore_target(run, run.tx)
        state, acc, meta = checkpoint.restore_preempted(run.workdir, preempted, target, acc)
        return state, int(meta["epoch"]), Position(int(meta["epoch"]), int(meta["batch"]), acc)
    if latest is None:
        return initial_state(run), 0, None
    state, meta = restore(run, mngr)
    return state, int(meta["epoch"]), None


def preempt(run: Run, state, position: Position, step: int, signum: int):
    """Saves the preemption checkpoint at ``position`` (global ``step``) and raises
    ``Preempted``."""
    start = time.perf_counter()
    meta = {"epoch": position.epoch, "batch": position.batch, "step": step}
    path = checkpoint.save_preempted(run.workdir, state, position.acc, meta)
    raise preemption.Preempted(
        signum,
        f"{preemption.name(signum)}: stopped after step {step} (epoch {position.epoch + 1}, "
        f"batch {position.batch}/{run.steps_per_epoch}); saved {path} in "
        f"{time.perf_counter() - start:.1f} s; the same command resumes from it",
    )


def save_epoch(run: Run, mngr, state, epoch: int, line: dict, drop_preempted: bool) -> None:
    """The epoch checkpoint (asynchronous); once committed, the older preemption checkpoint is
    deleted (``drop_preempted``). Then, if a signal came, stops (``stop_after_epoch``)."""
    checkpoint.save(mngr, state, epoch + 1, {k: v for k, v in line.items() if k != "epoch"})
    if drop_preempted:
        mngr.wait_until_finished()
        checkpoint.discard_preempted(run.workdir)
    stop_after_epoch(mngr, epoch)


def stop_after_epoch(mngr, epoch: int) -> None:
    """Raises ``Preempted`` once the epoch checkpoint is committed if a signal came."""
    signum = preemption.epoch_stop_signal()
    if signum is None:
        return
    mngr.wait_until_finished()
    raise preemption.Preempted(
        signum,
        f"{preemption.name(signum)}: stopped after epoch {epoch + 1}; saved "
        f"{Path(mngr.directory) / str(mngr.latest_step())}; the same command resumes from it",
    )
