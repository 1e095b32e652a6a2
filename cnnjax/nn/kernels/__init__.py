"""Native CPU kernels behind a switch: which implementation runs cnnjax's convolutions.

``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature; the layers pass it to
``nn.Conv`` (``cnnjax.nn.layers.ConvBN``, ``cnnjax.models.common.bare_conv``). It runs XLA's own
convolution unless the process's backend is ``onednn``, the default platform is the CPU and the
call is one ``onednn.supported`` accepts; then oneDNN's (``cnnjax/nn/kernels/onednn_conv.cc``).

The backend is ``config.conv_backend`` (``select``, called by the trainer), else the
``CNNJAX_CONV`` environment variable, else ``auto``:

- ``xla``: always XLA.
- ``onednn``: oneDNN on the CPU, built on first use if needed
  (``python -m cnnjax.nn.kernels.build``);
  where it cannot be built or loaded, XLA, with one log line saying why.
- ``auto``: ``AUTO``, the backend measured faster for whole training steps on CPU (see
  ``experiments/README.md``, "oneDNN convolutions (FFI)").

The choice is read when a function is traced: select it before the first ``jit`` call.
"""

import logging
import os

import jax
from jax import lax

BACKENDS = ("auto", "xla", "onednn")
ENV = "CNNJAX_CONV"
# What ``auto`` picks on CPU. Measured (experiments/README.md, "oneDNN convolutions (FFI)"):
# oneDNN made resnet20's whole step 1.3-1.5x faster but simple_cnn's, the default preset's
# model, 0.65-1.03x: not faster on both, so not the default.
AUTO = "xla"
# OpenMP threads per oneDNN call; 0 = OpenMP's default (OMP_NUM_THREADS, else one per core).
# Measured: 2 threads beat 1 per layer on a quiet 2-core machine, 1 beat 2 on a loaded one.
ONEDNN_THREADS = 0

log = logging.getLogger(__name__)
_state: dict = {"requested": None, "active": None}


def resolve(name: str | None = None) -> str:
    """The backend ``name`` (default: ``$CNNJAX_CONV``, else ``auto``) stands for on this
    process: ``xla`` or ``onednn``. ``auto`` defers to ``$CNNJAX_CONV`` when that is set.

    Raises:
      ValueError: an unknown name.
    """
    if name in (None, "auto"):
        name = os.environ.get(ENV) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"conv backend {name!r} is not one of {', '.join(BACKENDS)}")
    name = AUTO if name == "auto" else name
    if name == "onednn" and not _load_onednn():
        return "xla"
    return name


def _load_onednn() -> bool:
    from cnnjax.nn.kernels import build, onednn

    try:
        onednn.load()
    except (build.BuildError, OSError, AttributeError) as e:
        log.warning("oneDNN convolutions unavailable, using XLA's: %s", e)
        return False
    if ONEDNN_THREADS:
        onednn.set_threads(ONEDNN_THREADS)
    return True


def select(name: str | None = None) -> str:
    """Makes ``name`` (see ``resolve``) this process's backend; returns ``xla`` or ``onednn``."""
    requested = (name, os.environ.get(ENV))
    if _state["requested"] != requested or _state["active"] is None:
        _state["requested"], _state["active"] = requested, resolve(name)
    return _state["active"]


def active() -> str:
    """This process's backend (``select``'s, else resolved from the environment once)."""
    if _state["active"] is None:
        select(None)
    return _state["active"]


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated``, through oneDNN where the backend and the call allow."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    groups = (feature_group_count, batch_group_count)
    if active() == "onednn" and jax.default_backend() == "cpu":
        from cnnjax.nn.kernels import onednn

        if onednn.supported(*args, *groups, preferred_element_type):
            return onednn.conv(*args, *groups, precision, preferred_element_type)
    return lax.conv_general_dilated(*args, *groups, precision, preferred_element_type)
