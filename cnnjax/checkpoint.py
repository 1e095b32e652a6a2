"""Orbax checkpoints of a run: ``WORKDIR/checkpoints/<step>/{state,meta}``.

Kept: the latest ``max_to_keep`` checkpoints plus the best by a metric. ``meta``
holds the epoch and that epoch's metrics; the data order and dropout keys derive from
``(seed, epoch, step)``, so restoring ``state`` and ``epoch`` is all a bit-identical resume needs.
"""

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

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
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def run_manager(config, workdir, read_only: bool = False):
    """The manager of a run's checkpoints, tracking the config's best metric."""
    c = config.checkpointing
    return manager(workdir, c.max_to_keep, c.best_metric, c.best_mode, read_only)


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


def load_run_config(workdir: Path) -> ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``)."""
    path = workdir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{workdir} is not a cnnjax run directory (no config.json)")
    return ConfigDict(json.loads(path.read_text()))
