"""Model registry: every architecture by name.

``get(name, num_classes=..., **kwargs)`` returns a Linen module whose ``__call__(x, train)`` maps
NHWC images to float32 logits; ``names()`` lists what is registered. Families register themselves
with ``@register`` in their own module; this file imports them all explicitly.
"""

from collections.abc import Callable

import flax.linen as nn

from cnnjax.errors import unknown_name

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator adding a model factory ``fn(num_classes, **kwargs) -> nn.Module``."""

    def add(f):
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = f
        return f

    return add if fn is None else add(fn)


def names() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_REGISTRY)


def get(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Builds the model ``name`` with ``num_classes`` outputs.

    Raises:
      UnknownNameError: (a ``ValueError``) ``name`` is unknown; the message lists valid names.
    """
    if name not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


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
