"""Model registry: every architecture by name.

``get(name, num_classes=..., **kwargs)`` returns a Linen module whose ``__call__(x, train)`` maps
NHWC images to float32 logits; ``names()`` lists what is registered. Families register themselves
with ``@register`` in their own module; this file imports them all explicitly. A config names its
model with a group, ``config.model.name`` plus any of the model's attributes
(``config.model.small_input``, ``config.model.widths``): ``from_config`` validates and builds it.
``remat`` (``config.remat``, see ``common.REMAT_CHOICES``) rematerialises each repeated block
without changing any parameter path.
"""

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.errors import ConfigError, InputTooSmallError
from cnnjax.models.common import remat_policy
from cnnjax.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register = MODELS.register  # decorator: a factory ``fn(num_classes, **kwargs) -> nn.Module``

# Attributes every model has that the config sets elsewhere (``num_classes`` from the dataset,
# ``dtype`` from ``config.dtype``, ``remat`` from ``config.remat``) or that are Linen's own.
_NOT_OPTIONS = ("num_classes", "dtype", "remat", "parent", "name")
_LITERAL_TYPES = (bool, int, float, str, tuple, type(None))


def names() -> list[str]:
    """Sorted names of every registered model."""
    return MODELS.names()


def get(name: str, num_classes: int = 10, remat: str = "none", **kwargs) -> nn.Module:
    """Builds the model ``name`` with ``num_classes`` outputs, its repeated blocks
    rematerialised as ``remat`` (``config.remat``) says: the same parameters either way.

    Raises:
      UnknownNameError: (a ``ValueError``) ``name`` is unknown; the message lists valid names.
      ConfigError: ``num_classes`` is not a positive integer; ``remat`` is not a valid value, or
        not ``none`` for a model without repeated blocks.
    """
    factory = MODELS[name]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    module = factory(num_classes=num_classes, **kwargs)
    if remat_policy(remat) is None:
        return module
    # Families with repeated blocks have a ``remat`` attribute, read where they build them.
    if not any(f.name == "remat" for f in dataclasses.fields(module)):
        raise ConfigError(
            f"--config.remat={remat}: model {name!r} has no repeated blocks to rematerialise; "
            "use --config.remat=none"
        )
    return module.clone(remat=remat)


def options(name: str) -> dict[str, object]:
    """The attributes of model ``name`` a config may set (``config.model.<attribute>``), with
    their defaults: those whose values are plain literals (numbers, strings, tuples, None)."""
    module = get(name)
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.name not in _NOT_OPTIONS and isinstance(getattr(module, f.name), _LITERAL_TYPES)
    }


def _fits(value, default) -> bool:
    """Whether a config value can stand for an attribute whose default is ``default``."""
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, tuple):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


def check_config(model_config: Mapping, remat: str = "none") -> dict[str, object]:
    """Validates a ``config.model`` group (``name`` plus model attributes), and ``remat`` for
    that model, before anything is built; returns the attributes as keyword arguments (lists as
    tuples).

    Raises:
      UnknownNameError: the model name is unknown.
      ConfigError: an attribute the model does not have (the closest one named), a value of
        another type than the attribute's default, or a ``remat`` the model cannot take.
    """
    settings = dict(model_config)
    name = settings.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("config.model.name must name a model (see cnnjax.models.names())")
    allowed = options(name)
    kwargs = {}
    for key, value in settings.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"model {name!r} has no attribute {key!r} (config.model.{key}); {hint}"
                f"it has: {', '.join(sorted(allowed)) or 'none'}"
            )
        if not _fits(value, allowed[key]):
            raise ConfigError(
                f"config.model.{key}={value!r} must be like the default of {name}.{key}, "
                f"{allowed[key]!r}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if remat != "none":
        get(name, remat=remat)  # builds nothing but the module: raises for a bad remat
    return kwargs


def from_config(
    model_config: Mapping, num_classes: int, dtype: str = "float32", remat: str = "none"
) -> nn.Module:
    """The model a ``config.model`` group describes, computing in ``dtype``, rematerialised as
    ``remat`` (``config.remat``) says."""
    kwargs = check_config(model_config, remat)
    return get(model_config["name"], num_classes, remat, dtype=jnp.dtype(dtype), **kwargs)


def _empty_input_guard(next_fun, args, kwargs, context):
    """A Linen interceptor refusing a layer call on an empty array (a feature map shrunk to
    nothing), before an initialiser divides by its zero fan-in."""
    if context.method_name == "__call__":
        for arg in args:
            shape = getattr(arg, "shape", None)
            if shape is not None and 0 in shape:
                path = "/".join(context.module.path) or "(root)"
                raise InputTooSmallError(f"layer {path} gets an empty input {tuple(shape)}")
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def input_size_checked(model: nn.Module, input_shape: Sequence[int]) -> Iterator[None]:
    """Within: initialising or tracing ``model`` on images of ``input_shape`` (H, W, C) that are
    too small for it (a layer gets an empty input, a pooling window exceeds its input) raises a
    one-line ``ConfigError`` instead of an arithmetic error deep inside an initialiser.
    """
    try:
        with nn.intercept_methods(_empty_input_guard):
            yield
    except InputTooSmallError as e:
        raise ConfigError(
            f"images of shape {tuple(input_shape)} are too small for {type(model).__name__} "
            f"({e}); use larger images (data.image_size, --input-shape) or a model for small "
            "images (e.g. small_input=True)"
        ) from None


# Families register on import; keep this list explicit (no importlib on strings).
from cnnjax.models import (  # noqa: E402, F401
    alexnet,
    cnn,
    convnext,
    densenet,
    efficientnet,
    googlenet,
    lenet,
    mobilenet,
    resnet,
    small,
    vgg,
    wide_resnet,
)
