"""oneDNN 2-D convolutions as XLA FFI custom calls, differentiable through a ``custom_vjp``.

``conv`` has ``lax.conv_general_dilated``'s signature for NHWC activations and HWIO kernels;
``supported`` says whether a call can take this path (float32, 4-D, no input dilation, no
batch groups, non-negative padding, non-empty shapes). The backward pass is oneDNN's
backward-data and backward-weights primitives; it is not differentiable again (first-order
gradients only). Under ``vmap`` the custom calls run once per batch element
(``vmap_method="sequential"``): correct, not fast.
"""

import ctypes
import threading
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.nn.kernels import build

TARGETS = {
    "fwd": "CnnjaxOnednnConvFwd",
    "bwd_data": "CnnjaxOnednnConvBwdData",
    "bwd_weights": "CnnjaxOnednnConvBwdWeights",
}
NHWC = ("NHWC", "HWIO", "NHWC")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def load(build_if_missing: bool = True) -> ctypes.CDLL:
    """Loads the extension (building it first if asked and missing) and registers its targets
    with XLA's CPU backend, once per process.

    Raises:
      build.BuildError: it is not built and cannot be.
      OSError: it is built but cannot be loaded (e.g. libdnnl.so is gone).
    """
    global _lib
    with _lock:
        if _lib is None:
            path = build.build() if build_if_missing else build.library_path()
            lib = ctypes.CDLL(str(path))
            for name in TARGETS.values():
                capsule = jax.ffi.pycapsule(getattr(lib, name))
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            lib.CnnjaxOnednnSetThreads.argtypes = [ctypes.c_int]
            _lib = lib
    return _lib


def set_threads(n: int) -> None:
    """OpenMP threads per oneDNN call (0: the OpenMP default, ``OMP_NUM_THREADS`` or cores)."""
    load().CnnjaxOnednnSetThreads(int(n))


def _pads(padding, lhs_shape, rhs_shape, strides, dilation) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:2], dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs_shape[1:3], window, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_nhwc(dimension_numbers, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False  # lax's default is NCHW / OIHW
    given = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return given == lax.conv_dimension_numbers(lhs_shape, rhs_shape, NHWC)


def out_size(size: int, k: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    """lax's output length: floor((size + lo + hi - dilated window) / stride) + 1."""
    return (size + pad[0] + pad[1] - (k - 1) * dilation - 1) // stride + 1


def supported(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    preferred_element_type=None,
) -> bool:
    """Whether ``conv`` computes this ``lax.conv_general_dilated`` call."""
    if lhs.ndim != 4 or rhs.ndim != 4 or batch_group_count != 1:
        return False
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if preferred_element_type not in (None, jnp.float32):
        return False
    if any(d != 1 for d in (lhs_dilation or (1, 1))):
        return False
    if not _is_nhwc(dimension_numbers, lhs.shape, rhs.shape):
        return False
    dilation = tuple(rhs_dilation or (1, 1))
    pads = _pads(padding, lhs.shape, rhs.shape, window_strides, dilation)
    if any(p < 0 for pair in pads for p in pair) or 0 in lhs.shape or 0 in rhs.shape:
        return False
    sizes = zip(lhs.shape[1:3], rhs.shape[:2], window_strides, pads, dilation, strict=True)
    return all(out_size(*a) > 0 for a in sizes)


def conv(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated`` through oneDNN, for calls ``supported`` accepts.

    Args:
      lhs: (N, H, W, C) float32.
      rhs: (KH, KW, C / feature_group_count, O) float32.
      precision: ignored (float32 on CPU is computed in float32 either way).

    Returns:
      (N, OH, OW, O) float32.
    """
    del lhs_dilation, batch_group_count, precision, preferred_element_type  # checked by caller
    strides = tuple(int(s) for s in window_strides)
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    pads = _pads(padding, lhs.shape, rhs.shape, strides, dilation)
    return _conv(lhs, rhs, strides, pads, dilation, int(feature_group_count))


def _params(strides, pads, dilation, groups) -> np.ndarray:
    (pt, pb), (pl, pr) = pads
    return np.array([*strides, pt, pb, pl, pr, *dilation, groups], dtype=np.int64)


def _call(kind: str, shape, a, b, params: np.ndarray):
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(TARGETS[kind], out, vmap_method="sequential")(a, b, params=params)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, dilation, groups):
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    oh = out_size(h, kh, strides[0], pads[0], dilation[0])
    ow = out_size(wd, kw, strides[1], pads[1], dilation[1])
    return _call("fwd", (n, oh, ow, o), x, w, _params(strides, pads, dilation, groups))


def _conv_fwd(x, w, strides, pads, dilation, groups):
    return _conv(x, w, strides, pads, dilation, groups), (x, w)


def _conv_bwd(strides, pads, dilation, groups, residuals, dy):
    x, w = residuals
    params = _params(strides, pads, dilation, groups)
    dx = _call("bwd_data", x.shape, dy, w, params)
    dw = _call("bwd_weights", w.shape, x, dy, params)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)
