"""What each Linen module call did: path, type, input and output shapes, own variables, and
optionally the output values. The one recorder behind ``cnnjax.tools.summary`` (the layer
table) and ``cnnjax.tools.inspect`` (layer names, feature maps, Grad-CAM activations).

Built on Flax's public ``nn.intercept_methods``, with the rules of Flax's own ``nn.tabulate``:
a module's variables are those stored directly under its path (its submodules' are theirs), and
a module that calls a method of itself (a ``BatchNorm`` subclass calling ``super().__call__``, a
lifted ``nn.remat`` wrapper calling the module it wraps) makes one call, not two.
``nn.tabulate`` itself only renders a string, and its table-building internals are private.

Example::

    variables, calls = trace(lambda x: model.init(jax.random.key(0), x), x)  # shapes only
    with recording(keep={"conv1"}) as calls:  # inside jit: calls[i].value holds conv1's output
        logits = model.apply(variables, images)
"""

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """One call of a module's ``__call__``.

    Attributes:
      path: the module path joined with '/' (``stage1_block1/conv_bn1/conv``); '' for the root.
      module: an unbound copy of the module (its type and attributes: ``kernel_size``...).
      inputs: the positional arguments, arrays as ``jax.ShapeDtypeStruct``.
      outputs: the output, arrays as ``jax.ShapeDtypeStruct``.
      variables: collection -> number of values stored directly under ``path`` (``params``,
        ``batch_stats``...), as they stand after the call.
      value: the output itself where ``path`` was kept, else None.
    """

    path: str
    module: nn.Module
    inputs: tuple
    outputs: Any
    variables: dict[str, int]
    value: Any = None


@contextlib.contextmanager
def recording(keep: Collection[str] = ()) -> Iterator[list[ModuleCall]]:
    """Records every module ``__call__`` made inside the context, in the order the calls end
    (a module after its submodules, the order its output becomes available).

    Args:
      keep: paths whose calls keep their output in ``value`` (tracers under a transform: return
        them from the transformed function).

    Yields:
      The list the calls are appended to.
    """
    calls: list[ModuleCall] = []
    running: list[str] = []  # paths of the calls in progress, innermost last

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(module.path)
        if context.method_name != "__call__" or (running and running[-1] == path):
            return next_fun(*args, **kwargs)
        running.append(path)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            running.pop()
        calls.append(
            ModuleCall(
                path=path,
                module=module.copy(parent=None),
                inputs=_abstract(args),
                outputs=_abstract(out),
                variables=_own_sizes(module.variables),
                value=out if path in keep else None,
            )
        )
        return out

    with nn.intercept_methods(interceptor):
        yield calls


def trace(fn: Callable, *args) -> tuple[Any, list[ModuleCall]]:
    """``fn(*args)`` run abstractly (``jax.eval_shape``: nothing computed or allocated) with its
    module calls recorded.

    Args:
      fn: a function calling Linen modules, e.g. ``lambda x: model.init(key, x)`` or
        ``lambda v, x: model.apply(v, x)``.
      args: arrays or ``jax.ShapeDtypeStruct``.

    Returns:
      ``(shapes of fn's result, calls)``.
    """
    with recording() as calls:
        # A fresh function each time: jax caches traces by function, and a cached trace would
        # call no module.
        out = jax.eval_shape(lambda *a: fn(*a), *args)
    return out, calls


def _abstract(tree):
    """Arrays (and tracers) in ``tree`` -> ``jax.ShapeDtypeStruct``; other leaves as they are."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "dtype") else x, tree
    )


def _own_sizes(variables: Mapping) -> dict[str, int]:
    """Collection -> size of the arrays directly in it (a nested mapping is a submodule's)."""
    return {
        name: sum(v.size for v in collection.values() if not isinstance(v, Mapping))
        for name, collection in variables.items()
    }
