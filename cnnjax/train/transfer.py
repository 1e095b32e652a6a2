"""Transfer learning: initialise a TrainState from another run's best checkpoint or from
torchvision weights, by parameter path.

``config.init_from`` is another run's workdir, or ``torchvision:NAME[:SOURCE]`` (SOURCE: a
torchvision tag, default ``DEFAULT``; a ``.pth``/``.pt``/``.safetensors`` file; or a URL), read
by ``cnnjax.models.pretrained.load``. The run's ``config.model.name`` must be NAME. A run from
torchvision weights takes the weights' preprocessing (``run_info``); a run initialised from
another run inherits that run's.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.run import trained
from cnnjax.run.state import path_str

# Parameters under this prefix may change shape (a new classifier for another class count).
HEAD = "head/"
TORCHVISION = "torchvision:"
SPEC_HELP = "torchvision:NAME[:TAG|FILE|URL], e.g. torchvision:resnet50:IMAGENET1K_V2"


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
    """A parsed ``init_from=torchvision:NAME[:SOURCE]``."""

    name: str
    source: str = "DEFAULT"


def parse_torchvision(init_from: str | os.PathLike | None) -> TorchvisionWeights | None:
    """The torchvision weights ``init_from`` names, or None for a workdir (or nothing).

    Raises:
      ConfigError: ``torchvision:`` without a model name.
      UnknownNameError: a name without torchvision weights.
    """
    if not init_from or isinstance(init_from, os.PathLike):
        return None
    if not init_from.startswith(TORCHVISION):
        return None
    from cnnjax.models import pretrained

    name, _, source = init_from[len(TORCHVISION) :].partition(":")
    if not name:
        raise ConfigError(f"init_from={init_from!r} names no model; use {SPEC_HELP}")
    pretrained.FAMILIES.check(name)
    return TorchvisionWeights(name, source or "DEFAULT")


def check_init_from(config) -> None:
    """Fails before any data is read on a bad ``torchvision:`` spec: unknown name or tag, a
    missing file, or a model that is not the weights'.

    Raises:
      ConfigError, UnknownNameError, WeightsFileError: one line each.
    """
    spec = parse_torchvision(config.init_from)
    if spec is None:
        return
    if config.model.name != spec.name:
        raise ConfigError(
            f"init_from={config.init_from} holds {spec.name} weights but the model is "
            f"{config.model.name}: add --config.model.name={spec.name}"
        )
    from cnnjax.models import pretrained
    from cnnjax.models.pretrained import hub

    # Attributes torchvision builds the model with for its weights (GoogLeNet's input transform).
    for key, value in pretrained.MODEL_DEFAULTS.get(spec.name, {}).items():
        if config.model.get(key) != value:
            raise ConfigError(
                f"{spec.name}'s torchvision weights expect --config.model.{key}={value}"
            )
    hub.locate(spec.name, spec.source)


def weights_transform(spec: TorchvisionWeights):
    """The table entry (sizes, mean, std, interpolation) of ``spec``'s weights; a file or URL
    gets the transform of the name's ``DEFAULT`` weights (torchvision files carry none)."""
    from cnnjax.models.pretrained import hub, weights

    _, entry = hub.locate(spec.name, spec.source)
    return entry if entry is not None else weights.resolve(spec.name, "DEFAULT")[1]


def weights_preprocess(spec: TorchvisionWeights, image_size: int | None) -> Preprocess:
    """The weights' preprocessing for a run: RGB, their mean/std, images resized on the device
    to ``image_size`` (default: the weights' crop size)."""
    t = weights_transform(spec)
    return Preprocess(t.mean, t.std, image_size or t.crop_size, 3, t.interpolation)


def run_preprocess(config) -> Preprocess | None:
    """What a run's inputs go through besides normalisation with its data's statistics: the
    weights' for ``torchvision:``, the source run's for a workdir (None: nothing else)."""
    spec = parse_torchvision(config.init_from)
    if spec is not None:
        return weights_preprocess(spec, config.data.get("image_size"))
    if config.init_from:
        try:
            return trained.load_dataset_info(config.init_from).preprocess
        except CheckpointError as e:
            raise CheckpointError(f"init_from: {e}") from None
    return None


def run_info(config, info):
    """``info`` (a ``DatasetInfo``) with the run's preprocessing recorded."""
    preprocess = run_preprocess(config)
    return info if preprocess is None else dataclasses.replace(info, preprocess=preprocess)


def read_torchvision(spec: TorchvisionWeights) -> dict:
    """``{"params", "batch_stats"}`` of torchvision weights (the file's own head)."""
    from cnnjax.models import pretrained

    _, variables = pretrained.load(spec.name, spec.source)
    return variables


def read_pretrained(workdir) -> dict:
    """``{"params": ..., "batch_stats": ...}`` of another run's best checkpoint (its trained
    weights, not the EMA)."""
    try:
        run = trained.load_run(workdir)
    except CheckpointError as e:
        raise CheckpointError(f"init_from: {e}") from None
    return {"params": run.state.params, "batch_stats": run.state.batch_stats}


def merge(fresh, pretrained, what: str, source: str = "the pretrained run"):
    """``fresh`` with every leaf that ``pretrained`` has at the same path and shape.

    Leaves under ``head/`` whose shape differs keep their fresh values (a new head).

    Raises:
      CheckpointError: other paths are missing or differ in shape (listed in the message).
    """
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    mismatched = []

    def pick(path, leaf):
        key = path_str(path)
        old = flat.get(key)
        if old is not None and np.shape(old) == leaf.shape:
            return np.asarray(old, leaf.dtype)
        if not key.startswith(HEAD):
            mismatched.append(f"{what}/{key}")
        return leaf

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    if mismatched:
        shown = ", ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else "")
        raise CheckpointError(
            f"init_from: {len(mismatched)} parameter(s) do not match {source} "
            f"(missing or other shape): {shown}; use a run of the same model"
        )
    return merged


def load_pretrained(state, init_from: str | os.PathLike):
    """``state`` with params and batch_stats loaded from ``init_from``: a workdir's best
    checkpoint or ``torchvision:NAME[:SOURCE]`` (the EMA too, when kept); a head of another
    class count stays fresh; optimizer state and step stay fresh."""
    spec = parse_torchvision(init_from)
    if spec is None:
        pretrained, source = read_pretrained(init_from), "the pretrained run"
    else:
        pretrained, source = read_torchvision(spec), f"the {spec.name} weights"
    params = merge(state.params, pretrained["params"], "params", source)
    stats = merge(state.batch_stats, pretrained["batch_stats"], "batch_stats", source)
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)  # not donated twice
    return state.replace(params=params, batch_stats=stats, ema_params=ema)
