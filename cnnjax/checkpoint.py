"""Orbax checkpoints of a run: ``WORKDIR/checkpoints/<step>/{state,meta}``.

Kept: the latest ``max_to_keep`` checkpoints plus the best one by ``eval_accuracy``. ``meta``
holds the epoch and that epoch's metrics; the data order and dropout keys derive from
``(seed, epoch, step)``, so restoring ``state`` and ``epoch`` is all a bit-identical resume needs.
"""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cnnjax.errors import CheckpointError

BEST_METRIC = "eval_accuracy"


def _best_fn(metrics) -> float:
    return float(metrics.get(BEST_METRIC, float("-inf")))


def manager(workdir: str | Path, max_to_keep: int = 2, read_only: bool = False):
    """The run's CheckpointManager (created on first use unless ``read_only``)."""
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_fn,
        best_mode="max",
        preservation_policy=policy.AnyPreservationPolicy(
            [policy.LatestN(n=max_to_keep), policy.BestN(get_metric_fn=_best_fn, n=1)]
        ),
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


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
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise CheckpointError(
            f"no checkpoint at step {step} in {mngr.directory}; have: {mngr.all_steps()}"
        )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    try:
        restored = mngr.restore(step, args=args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {step} in {mngr.directory} does not match this config or is corrupt "
            f"({first_line[:200]}); use the config it was trained with, or another --workdir"
        ) from None
    return restored.state, restored.meta


def abstract_with_sharding(tree, sharding):
    """``jax.ShapeDtypeStruct``s of ``tree`` placed with ``sharding`` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
