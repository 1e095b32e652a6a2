"""Parameter and FLOP tables for any Linen model, computed from shapes alone.

``summary(model, (H, W, C))`` traces ``model.init`` under ``jax.eval_shape`` (nothing is
allocated, so ResNet-152 at 224 px costs a trace; ``cnnjax.tools.trace`` records the module
calls) and shows one row per layer: its output shape, its own trainable parameters and
non-trainable state (BatchNorm's ``batch_stats``), and its multiply-accumulates (MACs):

- ``nn.Conv``: ``out_h * out_w * kh * kw * (c_in / groups) * c_out`` (``count_padding=False``
  drops the taps that fall on zero padding, as XLA's cost analysis does);
- ``nn.Dense``: ``in * out`` per output position (``in * out`` for a flat input);
- everything else (norms, activations, pooling, additions, the SE gate's product) counts zero:
  these elementwise ops are a few percent of a CNN's arithmetic (XLA's cost analysis counts
  them, so it reads a few percent higher on e.g. MobileNet or ConvNeXt).

FLOPs = 2 x MACs. All counts are per image.

Command line (``cnnjax/summary.py``)::

    python -m cnnjax.summary --model resnet50 [--input-shape 224,224,3] [--num-classes 1000]
        [--batch-size 1] [--nocount-padding]
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from cnnjax import models
from cnnjax.errors import ConfigError
from cnnjax.tools.trace import ModuleCall, trace


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One layer (module path): a leaf module, or a module holding variables of its own beside
    its submodules.

    Attributes:
      output_shape: the output shape of the layer's first call.
      params: the layer's own trainable parameters (its ``params``).
      state: its own non-trainable values (``batch_stats`` and any other collection).
      macs: multiply-accumulates per image, summed over the layer's calls.
      calls: how many times the layer was called (a shared layer: more than one).
    """

    path: str
    module: str
    output_shape: Any
    params: int
    state: int
    macs: int
    calls: int = 1


@dataclasses.dataclass(frozen=True)
class SummaryTable:
    """The rows and totals of ``summary``; ``str(table)`` renders the Keras-like table.

    Attributes:
      rows: one per layer, in the order their first calls end (a module after its submodules).
      params: trainable parameters (the ``params`` collection).
      state: non-trainable values (every other collection, e.g. ``batch_stats``).
      macs: multiply-accumulates per image.
    """

    model: str
    input_shape: tuple[int, ...]
    rows: tuple[SummaryRow, ...]
    params: int
    state: int
    macs: int

    @property
    def flops(self) -> int:
        """FLOPs per image (2 per multiply-accumulate)."""
        return 2 * self.macs

    def __str__(self) -> str:
        head = ("Layer", "Type", "Output shape", "Params", "Non-trainable", "MACs")
        body = [
            (
                r.path if r.calls == 1 else f"{r.path} (x{r.calls})",
                r.module,
                _shape_str(r.output_shape),
                *(f"{n:,}" for n in (r.params, r.state, r.macs)),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        rule = "-" * len(fmt(head))
        lines = [f"{self.model} on input {self.input_shape}", "=" * len(rule), fmt(head), rule]
        lines += [fmt(row) for row in body]
        lines.append("=" * len(rule))
        if any(r.calls > 1 for r in self.rows):
            lines.append("(xN): called N times (output shape of the first call, MACs of all)")
        lines += [
            f"Trainable params:        {self.params:,} ({_human(self.params)})",
            f"Non-trainable params:    {self.state:,} (batch_stats and other collections)",
            f"MACs per image:          {self.macs:,} ({_human(self.macs)})",
            f"FLOPs per image (2xMAC): {self.flops:,} ({_human(self.flops)})",
        ]
        return "\n".join(lines)


def summary(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    count_padding: bool = True,
    print_fn: Callable[[str], Any] | None = print,
) -> SummaryTable:
    """Summarises ``model`` on images of ``input_shape`` (H, W, C) without initialising it.

    Args:
      model: a Linen module with ``__call__(x, train=False)``.
      input_shape: (H, W, C) of one image.
      batch_size: batch size of the traced input (only changes the shapes shown).
      count_padding: count every kernel tap, also those on zero padding (True: the convention of
        published tables, e.g. torchvision's 4.1 GMACs for ResNet-50), or only taps reading real
        input (False: what XLA's cost analysis counts; much lower on tiny feature maps, where a
        3x3 SAME conv on 2x2 reads 4 of its 9 taps per output on average).
      print_fn: called with the rendered table; None prints nothing.

    Returns:
      The ``SummaryTable``; MACs and FLOPs are per image.

    Raises:
      ConfigError: a bad ``input_shape`` or ``batch_size``, or images too small for the model.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(f"input_shape must be (H, W, C) of positive sizes, got {input_shape}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    x = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
    with models.input_size_checked(model, input_shape):
        variables, calls = trace(lambda x: model.init(jax.random.key(0), x, train=False), x)
    macs = lambda call: _macs(call, batch_size, count_padding)
    variables = dict(variables)
    params = variables.pop("params", {})
    size = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
    table = SummaryTable(
        model=type(model).__name__,
        input_shape=input_shape,
        rows=_rows(calls, macs),
        params=size(params),
        state=size(variables),
        macs=sum(macs(c) for c in calls),
    )
    if print_fn is not None:
        print_fn(str(table))
    return table


def _rows(calls: list[ModuleCall], macs: Callable[[ModuleCall], int]) -> tuple[SummaryRow, ...]:
    """One row per module path that is a leaf or holds variables of its own beside its
    submodules (a ConvNeXt block's layer scale); a path's calls fold into its row."""
    by_path: dict[str, list[ModuleCall]] = {}
    for call in calls:
        by_path.setdefault(call.path, []).append(call)
    parents = {"/".join(p.split("/")[:i]) for p in by_path if p for i in range(p.count("/") + 1)}
    rows = []
    for path, group in by_path.items():
        first = group[0]
        own = first.variables
        params = own.get("params", 0)
        state = sum(n for name, n in own.items() if name != "params")
        if path in parents and not params + state:
            continue
        rows.append(
            SummaryRow(
                path=path or "(root)",
                module=type(first.module).__name__,
                output_shape=jax.tree.map(lambda s: tuple(s.shape), first.outputs),
                params=params,
                state=state,
                macs=sum(macs(c) for c in group),
                calls=len(group),
            )
        )
    return tuple(rows)


def _macs(call: ModuleCall, batch_size: int, count_padding: bool) -> int:
    """Per-image MACs of a Conv or Dense call (0 for anything else)."""
    module, out = call.module, call.outputs
    if not isinstance(module, nn.Conv | nn.Dense) or not hasattr(out, "shape"):
        return 0
    x = call.inputs[0]
    cin = x.shape[-1]
    positions = math.prod(out.shape) // (batch_size * out.shape[-1])
    if isinstance(module, nn.Dense):
        return positions * cin * module.features
    channels = cin // module.feature_group_count * module.features
    rank = len(out.shape) - 2
    kernel = _tuple(module.kernel_size, rank)
    if count_padding or module.padding == "CIRCULAR":
        return positions * math.prod(kernel) * channels
    return _real_taps(module, x.shape[1:-1], out.shape[1:-1], kernel) * channels


def _real_taps(module: nn.Conv, in_size, out_size, kernel) -> int:
    """Sum over output positions of the kernel taps that read real input (not zero padding);
    separable, so the product of per-axis sums."""
    rank = len(kernel)
    strides = _tuple(module.strides or 1, rank)
    dilation = _tuple(module.kernel_dilation or 1, rank)
    padding = canonicalize_padding(module.padding, rank)
    if padding == "CAUSAL":
        padding = [((kernel[0] - 1) * dilation[0], 0)]
    elif isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
        padding = lax.padtype_to_pads(in_size, dilated, strides, padding)
    taps = 1
    for n, o, k, s, d, (lo, _) in zip(
        in_size, out_size, kernel, strides, dilation, padding, strict=True
    ):
        taps *= sum(1 for i in range(o) for t in range(k) if 0 <= i * s - lo + t * d < n)
    return taps


def _tuple(value, rank: int) -> tuple[int, ...]:
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _shape_str(shape) -> str:
    return str(shape).replace(" ", "") if shape is not None else "-"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"
