"""torchvision's ImageNet weights in the zoo's Linen models.

``model, variables = load("resnet50")`` gives ``cnnjax.models.get("resnet50", 1000)`` and its
``{"params", "batch_stats"}`` converted from torchvision's ``IMAGENET1K_V2`` file, such that
``model.apply(variables, x_nhwc, train=False)`` equals the torchvision model's eval output on the
same images (NCHW there), up to float32 rounding. Inputs are preprocessed as torchvision's
transforms do (``weights.WEIGHTS[name][tag]`` holds the sizes, mean and std).
"""

import functools
import importlib.resources
import os
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cnnjax import models
from cnnjax.models.pretrained import (
    alexnet,
    convnext,
    densenet,
    efficientnet,
    googlenet,
    hub,
    mobilenet,
    resnet,
    vgg,
)
from cnnjax.models.pretrained.mapping import PretrainedMismatchError, StateDict, assemble
from cnnjax.nn.layers import DenseHead
from cnnjax.registry import Registry

__all__ = ["FAMILIES", "PretrainedMismatchError", "from_state_dict", "imagenet_classes", "load"]

Converter = Callable[[StateDict], dict]

# zoo name -> its converter; every name here loads torchvision weights.
FAMILIES: Registry[Converter] = Registry(
    "model with torchvision weights",
    {
        **alexnet.CONVERTERS,
        **vgg.CONVERTERS,
        **resnet.CONVERTERS,
        **googlenet.CONVERTERS,
        **densenet.CONVERTERS,
        **mobilenet.CONVERTERS,
        **efficientnet.CONVERTERS,
        **convnext.CONVERTERS,
    },
)

# Where every zoo family keeps its classifier (a ``DenseHead`` named ``head``).
HEAD = "params/head/fc"

# Model attributes torchvision sets whenever it loads its weights: GoogLeNet's ImageNet weights
# expect inputs re-normalised to mean = std = 0.5 (torchvision's ``transform_input=True``).
MODEL_DEFAULTS: dict[str, dict] = {"googlenet": {"transform_input": True}}


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names in the order of torchvision's classifiers
    (``imagenet_classes.txt``, written from torchvision's ``_IMAGENET_CATEGORIES``)."""
    text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def load(
    name: str,
    source: str | os.PathLike = "DEFAULT",
    num_classes: int | None = None,
    seed: int = 0,
    **model_kwargs,
) -> tuple[nn.Module, dict]:
    """The zoo model ``name`` with torchvision weights.

    Args:
      name: a zoo name in ``FAMILIES``.
      source: a torchvision tag (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, ``"DEFAULT"``), an
        ``https://``/``http://``/``file://`` URL (downloaded into torch hub's cache) or a local
        ``.pth``/``.pt``/``.safetensors`` file holding a torchvision ``state_dict``.
      num_classes: classifier outputs; None keeps the file's (1000 for ImageNet). Any other
        count gets a freshly initialised head (logged) and everything else loaded.
      seed: PRNG seed of a new head.
      **model_kwargs: further ``cnnjax.models.get`` arguments (e.g. ``dtype``); GoogLeNet
        defaults to ``transform_input=True``, as torchvision builds it for its weights.

    Returns:
      ``(model, {"params": ..., "batch_stats": ...})`` of numpy arrays.

    Raises:
      UnknownNameError: ``name`` has no converter, or ``source`` is no known tag.
      WeightsUnavailableError: a download failed (offline).
      WeightsFileError: the file is corrupt or not a state_dict.
      PretrainedMismatchError: the file is for another model (names the first differing key).
    """
    FAMILIES.check(name)
    location, entry = hub.locate(name, source)
    path = hub.download(location) if hub.is_url(location) else location
    tensors = hub.read_state_dict(path)
    untrained_head = entry is not None and entry.num_classes is None
    return from_state_dict(
        name, tensors, f"{location} ({name})", num_classes, seed, untrained_head, **model_kwargs
    )


def from_state_dict(
    name: str,
    tensors: Mapping[str, np.ndarray],
    what: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    untrained_head: bool = False,
    **model_kwargs,
) -> tuple[nn.Module, dict]:
    """``load`` for a state_dict already in memory (torch key -> array in torch layout).

    Args:
      what: how messages name the weights (default: ``name``).
      untrained_head: the file's classifier is not trained: initialise a new one even at the
        file's class count.
    """
    FAMILIES.check(name)
    sd = StateDict(tensors, what or name)
    flat = FAMILIES[name](sd)
    file_classes = int(np.shape(flat[f"{HEAD}/bias"])[0])
    num_classes = file_classes if num_classes is None else num_classes
    kwargs = {**MODEL_DEFAULTS.get(name, {}), **model_kwargs}
    template = _shapes(models.get(name, num_classes=file_classes, **kwargs))
    variables = assemble(flat, template, sd)
    model = models.get(name, num_classes=num_classes, **kwargs)
    if num_classes != file_classes or untrained_head:
        logging.warning(
            "%s: new %d-class head (the file's has %d classes%s); everything else loaded",
            sd.what,
            num_classes,
            file_classes,
            ", untrained" if untrained_head else "",
        )
        variables["params"]["head"] = _new_head(num_classes, flat[f"{HEAD}/kernel"].shape[0], seed)
    return model, variables


def _shapes(model: nn.Module) -> dict:
    """The model's variables as shapes only (no memory, no compute)."""
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _new_head(num_classes: int, features: int, seed: int) -> dict:
    """A freshly initialised ``DenseHead`` (as the zoo models create it) for ``features`` inputs."""
    head = DenseHead(num_classes).init(jax.random.key(seed), jnp.zeros((1, features)))
    return jax.tree.map(np.asarray, head["params"])
