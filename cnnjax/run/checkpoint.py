"""Orbax checkpoints of a run: ``WORKDIR/checkpoints/<step>/{state,meta}`` and the preemption
checkpoint ``WORKDIR/preempted/<step>/{state,acc,meta}``.

Kept: the latest ``max_to_keep`` checkpoints plus the best by a metric. ``meta``
holds the epoch and that epoch's metrics; the data order and dropout keys derive from
``(seed, epoch, step)``, so restoring ``state`` and ``epoch`` is all a bit-identical resume needs.
A run stopped by a signal mid-epoch also leaves ``WORKDIR/preempted/<step>`` (``save_preempted``),
which only training reads. Opening a finished run is ``cnnjax.run.trained``.
"""

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cnnjax.errors import CheckpointError


def manager(
    workdir: str | Path,
    max_to_keep: int = 2,
    best_metric: str = "eval_accuracy",
    best_mode: str = "max",
    read_only: bool = False,
):
    """The run's CheckpointManager (created on first use unless ``read_only``), keeping the
    latest ``max_to_keep`` checkpoints and the best by ``best_metric``."""
    worst = float("-inf") if best_mode == "max" else float("inf")
    best_fn = lambda metrics: float(metrics.get(best_metric, worst))
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn,
        best_mode=best_mode,
        preservation_policy=policy.AnyPreservationPolicy(
            [
                policy.LatestN(n=max_to_keep),
                policy.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1),
            ]
        ),
        read_only=read_only,
        create=not read_only,
    )
    directory = Path(workdir).absolute() / "checkpoints"
    try:  # Orbax reads every checkpoint's metrics here: a damaged one fails at once
        return ocp.CheckpointManager(directory, options=options)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoints in {directory} are unreadable ({e}); the run directory is damaged: "
            "delete the damaged checkpoints/<step> or use another --workdir"
        ) from None


def save(mngr, state, epoch: int, metrics: dict) -> None:
    """Saves ``state`` at its step with the epoch and metrics (asynchronously)."""
    meta = {"epoch": epoch, **metrics}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    mngr.save(int(state.step), args=args, metrics=metrics)


def restore(mngr, target, step: int | None = None):
    """Restores ``(state, meta)`` at ``step`` (default: latest) into the shapes of ``target``.

    ``target`` is an abstract TrainState (``jax.eval_shape``) whose shardings say where the
    arrays go.

    Raises:
      CheckpointError: no checkpoint, or one that does not fit ``target`` (another model or
        optimizer wrote it) or cannot be read.
    """
    step = checkpoint_step(mngr, mngr.latest_step() if step is None else step)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    restored = restore_step(mngr, step, args)
    return restored.state, restored.meta


def restore_step(mngr, step: int, args):
    """``mngr.restore(step, args)``, an unreadable or mismatching checkpoint as one line."""
    try:
        return mngr.restore(step, args=args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {step} in {mngr.directory} does not match this config or is corrupt "
            f"({first_line[:200]}); use the config it was trained with, or another --workdir"
        ) from None


def abstract_with_sharding(tree, sharding):
    """``jax.ShapeDtypeStruct``s of ``tree`` placed with ``sharding`` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def checkpoint_step(mngr, step: int | None) -> int:
    """``step``, or the best checkpoint's (the latest when none has the best metric)."""
    if step is None:
        step = mngr.best_step()
        step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise CheckpointError(
            f"no checkpoint at step {step} in {mngr.directory}; have: {mngr.all_steps()}"
        )
    return step


# The preemption checkpoint: ``WORKDIR/preempted/<step>/{state,acc,meta}``, apart from the epoch
# checkpoints (which evaluation, prediction and ``load_run`` read), written when a signal stops
# training mid-epoch and deleted once a later epoch checkpoint is committed.
PREEMPTED = "preempted"


def _preempted_manager(workdir, read_only: bool = False):
    """One synchronous checkpoint at most; Orbax writes into a temporary directory and renames it
    when complete, and lists (restores) only the renamed ones."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, read_only=read_only, create=not read_only, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / PREEMPTED, options=options)


def save_preempted(workdir, state, acc: dict, position: dict) -> Path:
    """Saves ``state``, the partial epoch's metric sums ``acc`` and ``position`` (``epoch``,
    ``batch``: the next batch of that epoch, ``step``); returns the committed directory.

    A committed one of the same step holds the same state (a run resumed from it stopped again
    before its next step): it is kept rather than rewritten, so there is no moment without one.
    """
    step = int(position["step"])
    path = Path(workdir).absolute() / PREEMPTED / str(step)
    if preempted_step(workdir) == step:
        return path
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        acc=ocp.args.StandardSave(acc),
        meta=ocp.args.JsonSave(position),
    )
    mngr = _preempted_manager(workdir)
    try:
        mngr.save(step, args=args, force=True)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return path


def preempted_step(workdir) -> int | None:
    """The step of the committed preemption checkpoint, or None."""
    if not (Path(workdir) / PREEMPTED).is_dir():
        return None
    mngr = _preempted_manager(workdir, read_only=True)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def restore_preempted(workdir, step: int, state_target, acc_target):
    """``(state, acc, position)`` of the preemption checkpoint at ``step``."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(state_target),
        acc=ocp.args.StandardRestore(acc_target),
        meta=ocp.args.JsonRestore(),
    )
    mngr = _preempted_manager(workdir, read_only=True)
    try:
        restored = restore_step(mngr, step, args)
    finally:
        mngr.close()
    return restored.state, restored.acc, restored.meta


def discard_preempted(workdir) -> None:
    """Deletes the preemption checkpoints (process 0; renamed away first, so a kill halfway
    leaves nothing that looks committed)."""
    directory = Path(workdir) / PREEMPTED
    if jax.process_index() != 0 or not directory.is_dir():
        return
    doomed = directory.with_name(f"{PREEMPTED}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    directory.rename(doomed)
    shutil.rmtree(doomed)
