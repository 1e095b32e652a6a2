"""A run directory's JSON files (``config.json``, ``dataset.json``: their one schema), the one
check of a workdir before training touches it (``check_workdir``), and opening a trained run:
``load_run`` restores an eval-ready state from its best (or a chosen) checkpoint, building no
optimizer and reading no dataset.
"""

import ast
import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from cnnjax import models, parallel
from cnnjax.data import preprocessing
from cnnjax.data.pipeline import DatasetInfo
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.run import checkpoint
from cnnjax.run import workdir as workdir_lib
from cnnjax.run.state import TrainState, init_variables, path_str


def run_manager(config, workdir, read_only: bool = False):
    """The manager of a run's checkpoints, tracking the config's best metric."""
    c = config.checkpointing
    return checkpoint.manager(workdir, c.max_to_keep, c.best_metric, c.best_mode, read_only)


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


def upgrade_config(saved: dict) -> dict:
    """A ``config.json`` written before the model became a group (``"model": "resnet18"`` with
    ``"model_kwargs": "{'small_input': True}"``) in today's layout
    (``"model": {"name": "resnet18", "small_input": True}``); current files unchanged."""
    saved = dict(saved)
    if isinstance(saved.get("model"), str):
        kwargs = ast.literal_eval(saved.pop("model_kwargs", None) or "{}")
        saved["model"] = {"name": saved["model"], **kwargs}
    return saved


def load_run_config(workdir: Path) -> ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``), in today's layout
    (``upgrade_config`` reads the files of older versions)."""
    return ConfigDict(upgrade_config(_read_json(Path(workdir) / "config.json", "")))


def load_dataset_info(workdir: Path) -> DatasetInfo:
    """What a run's model was trained on (``WORKDIR/dataset.json``)."""
    path = Path(workdir) / "dataset.json"
    _read_json(path, ": it was never trained")
    return DatasetInfo.from_json(path.read_text())


def save_dataset_info(info: DatasetInfo, workdir: Path) -> None:
    """Writes ``WORKDIR/dataset.json`` (atomically: a reader never sees half of it)."""
    workdir_lib.write_text_atomic(Path(workdir) / "dataset.json", info.to_json())


def data_image_shape(info: DatasetInfo, image_size: int | None) -> tuple[int, int, int]:
    """(H, W, C) of the uint8 images the input pipeline yields: the dataset's image shape, or
    ``data.image_size`` for a dataset of variable-size images."""
    shape = tuple(info.image_shape)
    if None not in shape:
        return shape
    if not image_size or shape[-1] is None:
        raise ConfigError(f"run trained on images of variable shape {shape} without image_size")
    return (image_size, image_size, shape[-1])


def model_input_shape(info: DatasetInfo, image_size: int | None) -> tuple[int, int, int]:
    """(H, W, C) of the model's inputs: the pipeline's images after the run's preprocessing
    (resized and RGB for a run from torchvision weights; unchanged otherwise)."""
    return preprocessing.of(info).output_shape(data_image_shape(info, image_size))


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
        return model_input_shape(self.info, self.config.data.get("image_size"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the uint8 images ``preprocess`` takes (the dataset's, as trained on)."""
        return data_image_shape(self.info, self.config.data.get("image_size"))

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
    input_shape = model_input_shape(info, config.data.get("image_size"))
    target = eval_target(model, input_shape, bool(config.ema_decay), mesh)
    mngr = run_manager(config, workdir, read_only=True)
    try:
        step = checkpoint.checkpoint_step(mngr, step)
        _check_shapes(mngr, step, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        state_args = ocp.args.PyTreeRestore(target, restore_args, partial_restore=True)
        args = ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        restored = checkpoint.restore_step(mngr, step, args)
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
    return checkpoint.abstract_with_sharding(target, parallel.replicated(mesh))


# Config keys that define what a workdir's checkpoints contain: resuming with other values
# would fail to restore or silently mix two different runs.
IDENTITY_KEYS = ("model", "dataset", "optimizer", "dtype")


def check_workdir(workdir, create: bool = True, config: dict | None = None) -> Path:
    """The one check of a run directory, before training touches it: creates ``workdir`` if
    needed (only if ``create``: the first process of a multi-host run) and returns it. A
    workdir that holds a run must hold a readable ``config.json`` and, given the ``config``
    (as JSON) about to train there, the same run: its ``IDENTITY_KEYS`` equal.

    Raises:
      CheckpointError: ``workdir`` is a file, lies under one, or cannot be created or written
        (the message names the path and the reason), holds a damaged ``config.json`` or a
        different run.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"--workdir={workdir} is a file, not a directory")
    if create:
        _create(workdir)
    if (workdir / "config.json").exists():  # a run to resume: its config must be readable
        _check_same_run(workdir, config)
    return workdir


def _create(workdir: Path) -> None:
    """Creates ``workdir`` and proves it writable (CheckpointError naming the path if not)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = e.filename or workdir
        raise CheckpointError(
            f"--workdir={workdir} cannot be created: {where}: {e.strerror or e}"
        ) from None
    try:  # by creating a file: root passes os.access on a read-only mount
        workdir_lib.probe_writable(workdir)
    except OSError as e:
        raise CheckpointError(
            f"--workdir={workdir} is not writable: {e.filename or workdir}: {e.strerror or e}"
        ) from None


def _check_same_run(workdir: Path, config: dict | None) -> None:
    """Refuses a damaged ``config.json``, or one of another run than ``config``'s."""
    saved = load_run_config(workdir).to_dict()
    diff = [k for k in IDENTITY_KEYS if config and k in saved and saved[k] != config.get(k)]
    if diff:
        details = ", ".join(f"{k}: {saved[k]!r} -> {config.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"workdir {workdir} holds a different run ({details}); use another --workdir "
            "or the original config"
        )
