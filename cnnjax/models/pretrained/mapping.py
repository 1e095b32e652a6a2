"""From a torchvision ``state_dict`` to the zoo's Linen variables, tensor by tensor.

A family's converter reads every tensor it needs through a ``StateDict`` (which converts torch
layouts to Flax's: OIHW -> HWIO kernels, (out, in) -> (in, out) Linear weights, BatchNorm running
statistics into ``batch_stats``) and writes it under a flat Flax path such as
``params/stem/conv/kernel``. ``assemble`` then checks the result against the model's own
variable shapes. Every mismatch (a key the file lacks, a key nothing used, a shape that
differs) is a ``PretrainedMismatchError`` naming the first offending key.
"""

import math
from collections.abc import Callable, Mapping

import numpy as np
from flax import traverse_util

from cnnjax.errors import CnnjaxError

# Torch keeps a step counter beside each BatchNorm's statistics; it has no Flax counterpart.
IGNORED_SUFFIXES = ("num_batches_tracked",)


class PretrainedMismatchError(CnnjaxError, ValueError):
    """A weights file does not fit the zoo model it is loaded into."""


class StateDict:
    """A torchvision ``state_dict`` (key -> numpy array) consumed key by key.

    Args:
      tensors: torch key -> array in torch layout.
      what: how to name the file in messages (its path or URL, and the model).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], what: str):
        self._tensors = dict(tensors)
        self._used: set[str] = set()
        self.what = what

    def take(self, key: str) -> np.ndarray:
        """The tensor ``key``, marked as used."""
        if key not in self._tensors:
            raise PretrainedMismatchError(
                f"{self.what}: missing key {key!r} (is the file for this model?)"
            )
        self._used.add(key)
        return np.asarray(self._tensors[key], np.float32)

    def has(self, key: str) -> bool:
        return key in self._tensors

    def skip(self, prefix: str) -> None:
        """Marks every key under ``prefix.`` as used: tensors the zoo model deliberately has no
        place for (GoogLeNet's auxiliary classifiers)."""
        self._used.update(k for k in self._tensors if k.startswith(f"{prefix}."))

    def rename(self, fn: Callable[[str], str]) -> None:
        """Renames every key through ``fn`` (legacy key spellings onto today's)."""
        self._tensors = {fn(k): v for k, v in self._tensors.items()}

    def conv(self, prefix: str, bias: bool = False) -> dict[str, np.ndarray]:
        """``prefix.weight`` (O, I/groups, kH, kW) -> ``{"kernel": (kH, kW, I/groups, O)}``, with
        ``"bias"`` when asked for."""
        out = {"kernel": self.take(f"{prefix}.weight").transpose(2, 3, 1, 0)}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias")
        return out

    def linear(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
        """``prefix.weight`` (out, in) -> ``{"kernel": (in, out), "bias": (out,)}``."""
        out = {"kernel": self.take(f"{prefix}.weight").T}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias")
        return out

    def batch_norm(self, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A BatchNorm's ``(params, batch_stats)``: ``({"scale", "bias"}, {"mean", "var"})``."""
        params = {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}
        stats = {
            "mean": self.take(f"{prefix}.running_mean"),
            "var": self.take(f"{prefix}.running_var"),
        }
        return params, stats

    def layer_norm(self, prefix: str) -> dict[str, np.ndarray]:
        """A LayerNorm's ``{"scale", "bias"}``."""
        return {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}

    def unused(self) -> list[str]:
        """Keys no converter read (torch's BatchNorm step counters excepted), in file order."""
        return [
            k for k in self._tensors if k not in self._used and not k.endswith(IGNORED_SUFFIXES)
        ]


def put(flat: dict, base: str, tensors: Mapping[str, np.ndarray]) -> None:
    """``flat[f"{base}/{name}"] = tensor`` for each entry (``base`` like ``params/stem/conv``)."""
    for name, tensor in tensors.items():
        flat[f"{base}/{name}"] = tensor


def put_conv_bn(flat: dict, sd: StateDict, flax_path: str, conv: str, bn: str) -> None:
    """A ``ConvBN`` at ``flax_path`` from torch's conv ``conv`` and BatchNorm ``bn``: the kernel
    under ``params/<flax_path>/conv``, the norm under ``params|batch_stats/<flax_path>/bn``."""
    put(flat, f"params/{flax_path}/conv", sd.conv(conv))
    params, stats = sd.batch_norm(bn)
    put(flat, f"params/{flax_path}/bn", params)
    put(flat, f"batch_stats/{flax_path}/bn", stats)


def flatten_rows_chw_to_hwc(kernel: np.ndarray, channels: int) -> np.ndarray:
    """The first Linear after a flatten, from torch's (C, H, W) flattening to the zoo's (H, W, C).

    Args:
      kernel: (C * H * W, out) Flax kernel of a square H = W feature map with ``channels``.

    Returns:
      (H * W * C, out): row ``(h * W + w) * C + c`` holds torch's row ``(c * H + h) * W + w``.
    """
    rows, out = kernel.shape
    side = math.isqrt(rows // channels)
    if side * side * channels != rows:
        raise PretrainedMismatchError(
            f"a Linear with {rows} inputs cannot follow a square {channels}-channel feature map"
        )
    return kernel.reshape(channels, side, side, out).transpose(1, 2, 0, 3).reshape(rows, out)


def assemble(flat: Mapping[str, np.ndarray], template, sd: StateDict) -> dict:
    """Nested ``{"params": ..., "batch_stats": ...}`` from ``flat`` paths, checked against
    ``template`` (the model's variables or their ``jax.eval_shape``).

    Raises:
      PretrainedMismatchError: a template leaf without a tensor, a tensor of another shape, a
        converted tensor the model has no place for, or a file key nothing read; the message
        names the first one.
    """
    expected = traverse_util.flatten_dict(dict(template), sep="/")
    for path, leaf in expected.items():
        if path not in flat:
            raise PretrainedMismatchError(f"{sd.what}: nothing converted for the model's {path}")
        if tuple(np.shape(flat[path])) != tuple(leaf.shape):
            raise PretrainedMismatchError(
                f"{sd.what}: {path} has shape {tuple(np.shape(flat[path]))}, the model "
                f"expects {tuple(leaf.shape)} (is the file for this model?)"
            )
    extra = [p for p in flat if p not in expected]
    if extra:
        raise PretrainedMismatchError(f"{sd.what}: the model has no variable {extra[0]}")
    unused = sd.unused()
    if unused:
        raise PretrainedMismatchError(
            f"{sd.what}: unexpected key {unused[0]!r} ({len(unused)} unused; is the file for "
            "this model?)"
        )
    nested = traverse_util.unflatten_dict(
        {tuple(p.split("/")): np.asarray(v, expected[p].dtype) for p, v in flat.items()}
    )
    return {"params": nested.get("params", {}), "batch_stats": nested.get("batch_stats", {})}
