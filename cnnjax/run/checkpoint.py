"""Orbax checkpoints of a run: ``WORKDIR/checkpoints/<step>/{state,meta}``, and ``load_run``,
the one way to open a trained run.

Kept: the latest ``max_to_keep`` checkpoints plus the best by a metric. ``meta``
holds the epoch and that epoch's metrics; the data order and dropout keys derive from
``(seed, epoch, step)``, so restoring ``state`` and ``epoch`` is all a bit-identical resume needs.
A run stopped by a signal mid-epoch also leaves ``WORKDIR/preempted/<step>`` (``save_preempted``),
which only the trainer reads.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from cnnjax import configs, models
from cnnjax.data import preprocessing
from cnnjax.data.pipeline import DatasetInfo
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.train import parallel
from cnnjax.train.state import TrainState, init_variables, path_str


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
    step = _checkpoint_step(mngr, mngr.latest_step() if step is None else step)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    restored = _restore_step(mngr, step, args)
    return restored.state, restored.meta


def _restore_step(mngr, step: int, args):
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


def _read_json(path: Path, what: str) -> dict:
    """A run's JSON file; missing or unreadable is a one-line CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} is not a cnnjax run directory (no {path.name}){what}")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the run directory is damaged") from None
    missing = [k for k in _REQUIRED[path.name] if not isinstance(content, dict) or k not in content]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the run directory is damaged")
    return content


# The keys of a run's JSON files that opening the run reads.
_REQUIRED = {
    "config.json": ("model", "dataset", "dtype", "data", "checkpointing"),
    # Fields with a default (the preprocessing of runs from pretrained weights) are optional.
    "dataset.json": tuple(
        f.name for f in dataclasses.fields(DatasetInfo) if f.default is dataclasses.MISSING
    ),
}


def load_run_config(workdir: Path) -> ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``), in today's layout
    (``configs.upgrade`` reads the files of older versions)."""
    return ConfigDict(configs.upgrade(_read_json(Path(workdir) / "config.json", "")))


def load_dataset_info(workdir: Path) -> DatasetInfo:
    """What a run's model was trained on (``WORKDIR/dataset.json``)."""
    path = Path(workdir) / "dataset.json"
    _read_json(path, ": it was never trained")
    return DatasetInfo.load(path)


def data_image_shape(config, info: DatasetInfo) -> tuple[int, int, int]:
    """(H, W, C) of the uint8 images the input pipeline yields: the dataset's image shape, or
    ``data.image_size`` for a dataset of variable-size images."""
    shape = tuple(info.image_shape)
    if None not in shape:
        return shape
    size = config.data.get("image_size")
    if not size or shape[-1] is None:
        raise ConfigError(f"run trained on images of variable shape {shape} without image_size")
    return (size, size, shape[-1])


def model_input_shape(config, info: DatasetInfo) -> tuple[int, int, int]:
    """(H, W, C) of the model's inputs: the pipeline's images after the run's preprocessing
    (resized and RGB for a run from torchvision weights; unchanged otherwise)."""
    return preprocessing.of(info).output_shape(data_image_shape(config, info))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained run opened for use: what it was trained with and an eval-ready state.

    ``state`` holds the step, params, BatchNorm statistics and EMA weights; it has no optimizer
    (``tx`` and ``opt_state`` are None), so it evaluates and predicts but does not train.
    """

    workdir: Path
    config: ConfigDict
    info: DatasetInfo
    model: nn.Module
    state: TrainState  # replicated over the mesh it was loaded on
    epoch: int

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model takes (after ``preprocess``)."""
        return model_input_shape(self.config, self.info)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the uint8 images ``preprocess`` takes (the dataset's, as trained on)."""
        return data_image_shape(self.config, self.info)

    @property
    def preprocess(self) -> preprocessing.Preprocess:
        """uint8 images -> model inputs, as the run was trained."""
        return preprocessing.of(self.info)

    @property
    def variables(self) -> dict:
        """``{"params", "batch_stats"}`` as evaluation uses them (the EMA weights if kept)."""
        return {"params": self.state.eval_params(), "batch_stats": self.state.batch_stats}


def load_run(workdir, step: int | None = None, mesh=None) -> TrainedRun:
    """Opens a trained run: its config, dataset info, model and the state at ``step`` (default:
    the best checkpoint), replicated over ``mesh`` (default: every device).

    Reads no dataset and builds no optimizer: the state is restored (only its params, BatchNorm
    statistics, EMA weights and step) against the abstract shapes of the model itself.

    Raises:
      CheckpointError: not a run directory, no such checkpoint, or one that does not fit.
    """
    workdir = Path(workdir)
    config = load_run_config(workdir)
    info = load_dataset_info(workdir)
    model = models.from_config(config.model, info.num_classes, config.dtype)
    mesh = parallel.make_mesh() if mesh is None else mesh
    target = eval_target(model, model_input_shape(config, info), bool(config.ema_decay), mesh)
    mngr = run_manager(config, workdir, read_only=True)
    try:
        step = _checkpoint_step(mngr, step)
        _check_shapes(mngr, step, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        state_args = ocp.args.PyTreeRestore(target, restore_args, partial_restore=True)
        args = ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        restored = _restore_step(mngr, step, args)
    finally:
        mngr.close()
    s = restored.state
    state = TrainState.for_inference(
        model.apply,
        s,
        step=s["step"],
        ema_params=s.get("ema_params"),
        ema_decay=float(config.ema_decay),
    )
    return TrainedRun(workdir, config, info, model, state, int(restored.meta["epoch"]))


def _checkpoint_step(mngr, step: int | None) -> int:
    """``step``, or the best checkpoint's (the latest when none has the best metric)."""
    if step is None:
        step = mngr.best_step()
        step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise CheckpointError(
            f"no checkpoint at step {step} in {mngr.directory}; have: {mngr.all_steps()}"
        )
    return step


def _check_shapes(mngr, step: int, target: dict) -> None:
    """Refuses, before any array is read, a checkpoint whose arrays have other shapes than
    ``target``'s (another model or class count wrote it): Orbax would fail halfway through its
    asynchronous reads and leave the others to print tracebacks at exit.

    Raises:
      CheckpointError: the first mismatching path and both shapes.
    """
    try:
        stored = ocp.PyTreeCheckpointer().metadata(Path(mngr.directory) / str(step) / "state")
        stored = stored.item_metadata.tree
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # unreadable metadata: the restore itself reports the damage
    shapes = {path_str(p): getattr(v, "shape", None) for p, v in _leaves(stored)}
    for path, leaf in _leaves(target):
        shape = shapes.get(path_str(path))
        if shape is not None and tuple(shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"checkpoint {step} in {mngr.directory} holds {path_str(path)} of shape "
                f"{tuple(shape)}, the model {tuple(leaf.shape)}: its config.json or "
                "dataset.json does not describe it; use another --workdir"
            )


def _leaves(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def eval_target(model, input_shape, ema: bool, mesh) -> dict:
    """The abstract part of a TrainState that evaluation needs, replicated on ``mesh``."""
    variables = jax.eval_shape(lambda k: init_variables(model, k, input_shape), jax.random.key(0))
    target = {
        "step": jax.ShapeDtypeStruct((), "int32"),
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
    }
    if ema:
        target["ema_params"] = variables["params"]
    return abstract_with_sharding(target, parallel.replicated(mesh))


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
        restored = _restore_step(mngr, step, args)
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
