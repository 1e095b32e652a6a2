"""The ONNX artifact of an export: ``model.onnx``, for every runtime that is neither JAX nor
TensorFlow (onnxruntime, TensorRT, OpenVINO, onnxruntime-web in browsers).

The graph is ``export.make_forward``'s function, the one the StableHLO artifact holds: uint8
images ``images`` [b, H, W, C] in (``b`` a symbolic batch), float32 ``probabilities`` [b, K]
out, normalisation, EMA weights and flip TTA inside, the weights as initializers, ONNX opset
``OPSET``. ``write_onnx`` converts, writes, then loads the file in onnxruntime and runs it on a
probe batch next to JAX, so an export that a runtime cannot run, or that answers otherwise,
is refused at export time rather than found when serving.

Why ``jax2onnx`` (0.17), converting the jaxpr: it is the maintained JAX -> ONNX converter
(one ONNX lowering per ``lax`` primitive) and needs no TensorFlow. The alternative, ``jax2tf``
then ``tf2onnx``, is closed with jax 0.10: ``jax2tf.convert`` ignores
``native_serialization=False`` and always emits an ``XlaCallModule`` op (serialized StableHLO),
which ``tf2onnx`` cannot translate. jax2onnx is given a jaxpr traced beforehand (``convert``), not
the Linen model: when it traces a Flax Linen model itself it substitutes its own versions of
``nn.max_pool`` and friends (keyword arguments only, so cnnjax's positional calls fail) and its
layout rewrites produced a ResNet-18 graph that onnxruntime refused ("Incompatible
dimensions"); from the jaxpr it sees exactly the primitives ``jax.export`` lowers. Two
primitives are re-expressed before conversion because jax2onnx 0.17.1 mishandles them
(``_REWRITES``); the result is the same arithmetic, the max and the copy being exact:

- ``reduce_window_max`` (overlapping max pooling: AlexNet, GoogLeNet, the ResNet and DenseNet
  ImageNet stems) becomes an ONNX MaxPool over all four NHWC axes, which onnxruntime rejects
  ("Unsupported pooling size"): it runs here as a pool over (H, W) of an (N * C, H, W) array.
- ``pad`` with a symbolic batch (the CIFAR ResNets' zero-padded shortcuts) fails while jax2onnx
  records the output shape: it runs here as a concatenation with constant blocks.

Install: ``pip install 'cnnjax[onnx]'`` (onnx, onnx-ir, onnxruntime) and
``pip install --no-deps 'jax2onnx>=0.17.1,<0.18'``; ``bash setup.sh onnx`` does both. jax2onnx's
metadata pins ``orbax-checkpoint<0.11.37``, which cnnjax's orbax-checkpoint 0.12 excludes, and
pulls in equinox, dm-pix, huggingface-hub, netron and orbax-export, none of which it imports for
``lax`` primitives. Nothing here imports them before an ONNX export is asked for.
"""

import contextlib
import importlib.util
import logging
import re
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from cnnjax.errors import ExportError

# Opset 17 (ONNX 1.12, 2022) rather than jax2onnx's default, 23: every zoo family converts to it
# (tests/test_export_onnx.py), and runtimes that lag the newest opsets read it.
OPSET = 17
# Protobuf refuses messages over 2 GiB: larger weights go to ``model.onnx.data`` next to the
# graph (ONNX's external data), less a margin for the graph itself.
SINGLE_FILE_LIMIT = 2**31 - 2**26
PROBE_BATCH = 2  # images run through onnxruntime and JAX at export time; > 1 tests the batch axis
# The probe guards against a wrong graph (a layout or operator bug is off by > 1e-2), not the
# float32 agreement: the tests show that (a few 1e-7), with a tolerance derived for it.
PROBE_ATOL = 1e-3
INSTALL = (
    "pip install 'cnnjax[onnx]' && pip install --no-deps 'jax2onnx>=0.17.1,<0.18' "
    "(bash setup.sh onnx does both)"
)
_MODULES = ("jax2onnx", "onnx", "onnx_ir", "onnxruntime")
_QUIET_LOGGERS = ("jax2onnx", "onnx_ir")  # plugin-import and shape-inference chatter


def check_available() -> None:
    """Raises ExportError, naming the install command, if a package ONNX export needs is missing.
    Imports nothing."""
    missing = [m for m in _MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format=onnx needs {', '.join(missing)}: {INSTALL}")


def write_onnx(forward, variables, input_shape, path, family: str) -> dict:
    """Writes ``forward`` with ``variables`` baked in as ONNX at ``path`` and checks it.

    Args:
      forward: ``forward(variables, images)`` -> probabilities (N, K) (``export.make_forward``).
      variables: numpy arrays, the model's ``{"params", "batch_stats"}``.
      input_shape: (H, W, C) of the uint8 images.
      path: the ``.onnx`` file to write (``path.data`` too, for weights over 2 GiB).
      family: the model's name, for error messages.

    Returns:
      ``export.json``'s ``onnx`` entry: files, opset, versions, probe difference.

    Raises:
      ExportError: an operator jax2onnx cannot convert or onnxruntime cannot run, or a graph
        that answers otherwise than JAX on the probe batch.
    """
    path = Path(path)
    model = convert(forward, variables, input_shape, family)
    weight_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables))
    files = save(model, path, weight_bytes)
    difference = probe(path, forward, variables, input_shape, family)
    return {
        "files": files,
        "opset": OPSET,
        "input": "images",
        "output": "probabilities",
        "jax2onnx_version": _version("jax2onnx"),
        "onnx_version": _version("onnx"),
        "onnxruntime_version": _version("onnxruntime"),
        "probe_max_abs_difference": difference,
    }


def convert(forward, variables, input_shape, family: str = "the model"):
    """``forward`` as an ``onnx.ModelProto`` (images [b, H, W, C] uint8 -> probabilities [b, K]).

    Raises:
      ExportError: a primitive jax2onnx cannot convert (named). Other converter failures are
        bugs and keep their traceback.
    """
    from jax2onnx import to_onnx

    h, w, c = input_shape
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, {c}"), jnp.uint8)
    # Traced here, with the symbolic batch jax2onnx then traces with (it keeps a given one).
    closed = jax.make_jaxpr(lambda images: forward(variables, images))(spec)

    def rewritten(images):
        (probabilities,) = evaluate(closed.jaxpr, closed.consts, images)
        return probabilities

    try:
        with _quiet(_QUIET_LOGGERS):
            return to_onnx(
                rewritten,
                [spec],
                model_name="cnnjax",
                opset=OPSET,
                input_names=["images"],
                output_names=["probabilities"],
            )
    except Exception as e:  # jax2onnx raises NotImplementedError, ValueError, TypeError, ...
        primitive = _failing_primitive(e)
        if primitive is None:
            raise
        raise ExportError(
            f"onnx: {family} uses {primitive}, which jax2onnx {_version('jax2onnx')} cannot "
            f"convert ({type(e).__name__}: {_first_line(e)})"
        ) from None


def evaluate(jaxpr, consts, *args) -> list:
    """Runs ``jaxpr`` on ``args`` (tracers, under jax2onnx), binding each primitive again, with
    calls (``jit``, ``custom_jvp_call``, ...) inlined and ``_REWRITES`` applied."""
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, _apply(eqn, [read(v) for v in eqn.invars]), strict=True))
    return [read(v) for v in jaxpr.outvars]


# Call primitives and the parameter holding their body: inlined (inference needs only the
# primal function of custom_jvp/custom_vjp calls, e.g. jax.nn.relu).
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}


def _apply(eqn, args) -> list:
    """The outputs of one equation on ``args``."""
    name = eqn.primitive.name
    if name in _CALLS:
        body = eqn.params[_CALLS[name]]
        if isinstance(body, jcore.ClosedJaxpr):
            return evaluate(body.jaxpr, body.consts, *args)
        return evaluate(body, (), *args)
    rewrite = _REWRITES.get(name)
    out = rewrite(*args, **eqn.params) if rewrite else None
    if out is not None:
        return [out]
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _spatial_max_pool(
    x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation
):
    """``reduce_window_max`` over (H, W) of a float (N, H, W, C) as a pool over (H, W) of
    (N * C, H, W), which jax2onnx turns into a 3-D MaxPool onnxruntime runs; None for any other
    window. MaxPool's padding counts as -inf, as ``reduce_window_max``'s does."""
    spatial = (1, 2)
    per_axis = (window_dimensions, window_strides, window_dilation)
    if (
        x.ndim != 4
        or not jnp.issubdtype(x.dtype, jnp.floating)
        or any(d != 1 for d in base_dilation)
        or any(p[0] != 1 or p[3] != 1 for p in per_axis)
        or padding[0] != (0, 0)
        or padding[3] != (0, 0)
    ):
        return None
    n, h, w, c = x.shape
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
    y = lax.reduce_window(
        y,
        jnp.array(-jnp.inf, x.dtype),
        lax.max,
        (1, *(window_dimensions[a] for a in spatial)),
        (1, *(window_strides[a] for a in spatial)),
        ((0, 0), *(tuple(padding[a]) for a in spatial)),
        window_dilation=(1, *(window_dilation[a] for a in spatial)),
    )
    return jnp.transpose(y.reshape(n, c, *y.shape[1:]), (0, 2, 3, 1))


def _pad_by_concatenation(x, padding_value, *, padding_config):
    """``lax.pad`` without interior or negative padding as concatenations with blocks of
    ``padding_value``; None otherwise."""
    if any(lo < 0 or hi < 0 or interior for lo, hi, interior in padding_config):
        return None
    for axis, (lo, hi, _) in enumerate(padding_config):
        blocks = []
        for size in (lo, hi):
            shape = (*x.shape[:axis], size, *x.shape[axis + 1 :])
            blocks.append(lax.broadcast_in_dim(padding_value, shape, ()) if size else None)
        parts = [p for p in (blocks[0], x, blocks[1]) if p is not None]
        x = lax.concatenate(parts, axis) if len(parts) > 1 else x
    return x


_REWRITES = {"reduce_window_max": _spatial_max_pool, "pad": _pad_by_concatenation}


def save(model, path: Path, weight_bytes: int) -> list[str]:
    """Writes ``model`` at ``path``, its weights in ``path.data`` when they exceed protobuf's
    2 GiB; returns the file names written."""
    import onnx

    if weight_bytes <= SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(path))
        return [path.name]
    data = f"{path.name}.data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,  # tensors under 1 KiB (shapes, scalars) stay inline, as runtimes expect
    )
    return [path.name, data]


def probe(path: Path, forward, variables, input_shape, family: str = "the model") -> float:
    """Runs the written model in onnxruntime on ``PROBE_BATCH`` random images and returns its
    largest |difference| from ``forward``'s probabilities.

    Raises:
      ExportError: onnxruntime cannot load or run it (the operator named), or the difference
        exceeds ``PROBE_ATOL``.
    """
    import onnxruntime as ort

    images = np.random.default_rng(0).integers(0, 256, (PROBE_BATCH, *input_shape), np.uint8)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its failure is reported below, as one line
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (got,) = session.run(["probabilities"], {"images": images})
    except Exception as e:  # onnxruntime's pybind errors share no useful base class
        raise ExportError(
            f"onnx: {family} uses {_ort_operator(str(e))}, which jax2onnx "
            f"{_version('jax2onnx')} converts into a graph onnxruntime {ort.__version__} cannot "
            f"run ({_first_line(e)})"
        ) from None
    expected = np.asarray(forward(variables, images))
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    if not difference <= PROBE_ATOL:
        raise ExportError(
            f"onnx: {family} converted by jax2onnx {_version('jax2onnx')} answers otherwise than "
            f"JAX in onnxruntime (max |probability difference| {difference:.3g} > "
            f"{PROBE_ATOL}): export another --format"
        )
    return difference


def _failing_primitive(error: BaseException) -> str | None:
    """The JAX primitive jax2onnx was lowering when ``error`` was raised: the innermost
    ``primitive_name`` of its lowering frames; None if it was not lowering one."""
    names = [
        frame.f_locals.get("primitive_name")
        for frame, _ in traceback.walk_tb(error.__traceback__)
        if frame.f_globals.get("__name__", "").startswith("jax2onnx.")
    ]
    names = [n for n in names if isinstance(n, str)]
    return names[-1] if names else None


def _ort_operator(message: str) -> str:
    """The ONNX operator an onnxruntime error names ("... running MaxPool node ...",
    "Node (n) Op (Add) ...", "... of operator (Transpose) ...")."""
    match = re.search(r"running (\w+) node|Op \((\w+)\)|of operator \((\w+)\)", message)
    return next(g for g in match.groups() if g) if match else "an operator"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet(names):
    """Raises the given loggers to ERROR for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
