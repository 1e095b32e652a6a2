"""Export a model for serving: uint8 NHWC images in, float32 class probabilities out.

``export_run(workdir, out)`` exports a trained run (``python -m cnnjax.export`` is its command
line); ``export_model`` exports any Linen model with its variables and normalisation, and is
what ``export_run`` calls. ``formats`` (``FORMATS``; default ``DEFAULT_FORMATS``) chooses what
``OUT`` holds:

- ``model.stablehlo`` (``stablehlo``): a ``jax.export`` artifact (serialized StableHLO, the
  weights inside as constants, so the file is about the size of the weights) of the eval-mode
  forward pass, with a symbolic batch dimension, lowered for every platform in ``PLATFORMS``.
  ``load(out)`` turns it back into a callable.
- ``saved_model/`` (``saved_model``): a TensorFlow SavedModel of the same function (signature
  ``serving_default``: ``images`` uint8 [None, H, W, C] -> ``probabilities`` float32 [None, K]),
  for TF Serving, and convertible by ``tf.lite.TFLiteConverter.from_saved_model``.
- ``model.onnx`` (``onnx``): an ONNX graph of the same function (opset 17, symbolic batch,
  weights inside), for onnxruntime, TensorRT, OpenVINO and browsers; written and checked in
  onnxruntime by ``cnnjax.tools.export.onnx_writer``, which says why jax2onnx and how.
- ``export.json``, always: input and output, class names, normalisation, the formats and their
  files, platforms, the jax, jaxlib, TensorFlow and ONNX versions, the checkpoint step and the
  compatibility window.

The function is ``cnnjax.tools.predict.probabilities`` itself (normalisation, the EMA weights when
the run kept them, flip test-time augmentation when the run used it, softmax in float32), so the
artifacts answer as ``python -m cnnjax.predict`` does.

Why ``jax.experimental.jax2tf`` (native serialization) for the SavedModel and not orbax-export:
orbax-export 0.0.8 installs next to orbax-checkpoint 0.12 and jax 0.10.2, but it would add four
packages (dataclasses-json, jaxtyping, marshmallow, wadler_lindig) while its TensorFlow path is
itself a wrapper of ``jax2tf.convert`` (``orbax/export/jax_module.py``). ``jax2tf`` ships with
jax 0.10.2, serializes the same StableHLO the ``jax.export`` artifact holds into an
``XlaCallModule`` op, and keeps the weights as ``tf.Variable``s (no 2 GiB GraphDef limit for
large models). TensorFlow is imported only when a SavedModel is written, the ONNX packages only
when ONNX is.
"""

import dataclasses
import datetime
import json
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import ConfigError, ExportError
from cnnjax.run import trained
from cnnjax.run.state import TrainState
from cnnjax.tools import predict as prediction

# jax 0.10.2 lowers to all of these without the hardware (multi-platform export keeps one
# lowering for the few primitives that differ; none of a CNN's do).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
METADATA_FILE = "export.json"
STABLEHLO_FILE = "model.stablehlo"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
FORMATS = ("stablehlo", "saved_model", "onnx")
DEFAULT_FORMATS = ("stablehlo", "saved_model")
FORMAT = "cnnjax-export/1"
COMPATIBILITY = (
    "model.stablehlo is guaranteed loadable only within jax.export's compatibility window: by a "
    "jaxlib built up to 6 months after, or up to 3 weeks before, the jaxlib that exported it "
    "(what counts is when each jaxlib was built; "
    "https://docs.jax.dev/en/latest/export/export.html#compatibility-guarantees). Re-export "
    "from the checkpoint to move past it. The SavedModel's XlaCallModule op carries the same "
    "StableHLO and has the same window for the TensorFlow that serves it. model.onnx holds no "
    "StableHLO: runtimes that implement its ONNX opset run it."
)


def export_run(workdir, out, step: int | None = None, **kwargs) -> dict:
    """Exports a trained run's checkpoint (default: the best) into ``out``.

    Args:
      workdir: the run directory.
      out: the export directory (created; a previous export there is replaced).
      step: checkpoint step; None: the best.
      **kwargs: passed on to ``export_model`` (``formats``, ``platforms``, ``saved_model``).

    Returns:
      The metadata written to ``out/export.json``.

    Raises:
      CheckpointError: not a run directory, or no such checkpoint.
      ConfigError: unknown formats or platforms.
      ExportError: ``out`` is a file, or a directory that is not an export; ONNX requested
        without its packages.
    """
    check_out(out)
    check_formats(kwargs.get("formats"), kwargs.get("saved_model", True))
    run = trained.load_run(workdir, step)
    source = {"workdir": str(Path(workdir).absolute()), "step": run.step}
    source["model"] = run.config.model.to_dict()
    source["dataset"] = run.info.name
    preprocess = run.preprocess
    return export_model(
        run.model,
        run.variables,
        run.image_shape,
        preprocess.mean,
        preprocess.std,
        run.info.class_names,
        out,
        dtype=run.config.dtype,
        flip_tta=bool(run.config.get("flip_tta", False)),
        source=source,
        preprocess=preprocess,
        **kwargs,
    )


def export_model(
    model,
    variables,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    out,
    *,
    dtype: str = "float32",
    flip_tta: bool = False,
    formats: Sequence[str] | None = None,
    platforms: Sequence[str] = PLATFORMS,
    saved_model: bool = True,
    source: dict | None = None,
    preprocess: Preprocess | None = None,
) -> dict:
    """Exports ``model`` in eval mode as uint8 images (N, H, W, C) -> probabilities (N, K).

    Args:
      model: a Linen module with ``__call__(x, train)`` returning logits (N, K).
      variables: ``{"params", "batch_stats"}`` to evaluate with (the EMA weights, if any).
      input_shape: (H, W, C) of the images.
      mean: (C,) normalisation mean in [0, 1] pixel units: the model sees
        ``(images / 255 - mean) / std``, as the trainer's ``steps.normalize`` computes it
        (torchvision weights: ``(0.485, 0.456, 0.406)`` and ``(0.229, 0.224, 0.225)``).
      std: (C,) normalisation standard deviation, [0, 1] units, each > 0.
      class_names: K names, in the order of the model's outputs.
      out: the export directory (created; a previous export there is replaced).
      dtype: compute dtype (the run's ``config.dtype``); the output is float32 either way.
      flip_tta: average the logits of each image and its mirror image.
      formats: the artifacts to write, some of ``FORMATS``; None: ``DEFAULT_FORMATS``.
      platforms: the platforms the StableHLO (and SavedModel) is lowered for (any of
        ``PLATFORMS``).
      saved_model: False drops ``saved_model`` from the default formats (``--nosaved_model``).
      source: where the model came from (e.g. workdir and step, ``model.name``), stored in
        ``export.json``.
      preprocess: the run's whole preprocessing (resize, channels, normalisation with ``mean``
        and ``std``); None: normalisation only.

    Returns:
      The metadata written to ``out/export.json``.

    Raises:
      ConfigError: shapes, normalisation, class names, formats or platforms that do not fit.
      ExportError: ``out`` is a file, or a directory that is not an export; ONNX requested
        without its packages, or a model it cannot express (the operator named).
    """
    out = check_out(out)
    formats = check_formats(formats, saved_model)
    preprocess = preprocess or Preprocess.normalize_only(mean, std)
    shape = _check_inputs(input_shape, mean, std, platforms, preprocess.channels)
    variables = jax.tree.map(np.asarray, flax.core.unfreeze(jax.device_get(variables)))
    forward = make_forward(model, preprocess, dtype, flip_tta)
    num_classes = _num_classes(forward, variables, shape)
    if num_classes != len(class_names):
        raise ConfigError(f"the model has {num_classes} outputs but {len(class_names)} class names")
    exported = (
        export_stablehlo(forward, variables, shape, platforms) if "stablehlo" in formats else None
    )
    meta = _metadata(shape, class_names, mean, std, dtype, flip_tta, platforms, source, exported)
    meta["formats"] = list(formats)
    family = (source or {}).get("model", {}).get("name") or type(model).__name__
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to ``out`` and renamed into place: a failed export leaves the old one whole.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_artifacts(formats, meta, tmp, forward, variables, shape, platforms, exported, family)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def check_formats(
    formats: Sequence[str] | None = None, saved_model: bool = True
) -> tuple[str, ...]:
    """The formats to write, in ``FORMATS`` order, after checking them (and, for ONNX, that its
    packages are installed).

    Args:
      formats: some of ``FORMATS``, or a comma-separated string of them; None:
        ``DEFAULT_FORMATS``.
      saved_model: False drops ``saved_model`` from the default (``--nosaved_model``).

    Raises:
      ConfigError: unknown formats, none, or ``saved_model`` both named and refused.
      ExportError: ``onnx`` without the packages it needs (the install command named).
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    if formats is None:
        formats = [f for f in DEFAULT_FORMATS if saved_model or f != "saved_model"]
    elif not saved_model and "saved_model" in formats:
        raise ConfigError("--format names saved_model but --nosaved_model refuses it; drop one")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(
            f"unknown export format {', '.join(unknown)}; choose from {', '.join(FORMATS)}"
        )
    if not formats:
        raise ConfigError(f"no export format given; choose some of {', '.join(FORMATS)}")
    if "onnx" in formats:
        from cnnjax.tools import onnx_writer

        onnx_writer.check_available()
    return tuple(f for f in FORMATS if f in formats)


def check_out(out) -> Path:
    """``out`` as an absolute Path, after checking it is neither a file nor a directory holding
    something other than an export (which would be overwritten).

    Raises:
      ExportError: it is.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory to export into")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA_FILE).is_file():
        raise ExportError(
            f"--out {out} is a non-empty directory without {METADATA_FILE}; export into a new "
            "directory (an earlier export is replaced, anything else is left alone)"
        )
    return out


def _check_inputs(input_shape, mean, std, platforms, channels=None) -> tuple[int, int, int]:
    """(H, W, C) after checking the normalisation has one positive entry per model input channel
    (``channels``, default C) and the platforms are known."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (H, W, C) positive integers, got {input_shape}")
    channels = channels or shape[-1]
    if np.shape(mean) != (channels,) or np.shape(std) != (channels,):
        raise ConfigError(
            f"mean and std need {channels} entries (one per channel), got "
            f"{np.shape(mean)} and {np.shape(std)}"
        )
    if min(std) <= 0:
        raise ConfigError(f"std must be positive, got {tuple(std)}")
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ConfigError(f"platforms must be some of {', '.join(PLATFORMS)}; got {platforms}")
    return shape


def make_forward(model, preprocess: Preprocess, dtype: str = "float32", flip_tta: bool = False):
    """``forward(variables, images)``: probabilities (N, K) float32 of uint8 images (N, H, W, C),
    computed by ``prediction.probabilities`` on a state holding ``variables`` as its params (so
    ``variables`` must already be the EMA weights when the run kept them)."""

    def forward(variables, images):
        state = TrainState.for_inference(model.apply, variables)
        return prediction.probabilities(state, images, preprocess, jnp.dtype(dtype), flip_tta)

    return forward


def export_stablehlo(forward, variables, input_shape, platforms=PLATFORMS):
    """``jax.export`` of ``forward`` with ``variables`` baked in as constants, for images of a
    symbolic batch size ``b`` (b >= 1) and the given (H, W, C)."""
    h, w, c = input_shape
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, {c}"), jnp.uint8)
    fn = jax.jit(lambda images: forward(variables, images))
    return jax.export.export(fn, platforms=tuple(platforms))(spec)


def _num_classes(forward, variables, input_shape) -> int:
    """K of ``forward``'s (N, K) output, from a trace (nothing is compiled)."""
    images = jax.ShapeDtypeStruct((1, *input_shape), jnp.uint8)
    return int(jax.eval_shape(forward, variables, images).shape[-1])


def _write_artifacts(
    formats, meta, directory, forward, variables, shape, platforms, exported, family
):
    """Writes each of ``formats`` into ``directory``, recording its files and versions in
    ``meta``."""
    if "stablehlo" in formats:
        (directory / STABLEHLO_FILE).write_bytes(exported.serialize())
        meta["artifacts"]["stablehlo"] = STABLEHLO_FILE
    if "saved_model" in formats:
        meta["tensorflow_version"] = write_saved_model(
            forward, variables, shape, platforms, directory / SAVED_MODEL_DIR
        )
        meta["artifacts"]["saved_model"] = SAVED_MODEL_DIR
    if "onnx" in formats:
        from cnnjax.tools import onnx_writer

        onnx = onnx_writer.write_onnx(forward, variables, shape, directory / ONNX_FILE, family)
        meta["onnx"] = onnx
        meta["artifacts"]["onnx"] = ONNX_FILE
        if len(onnx["files"]) > 1:
            meta["artifacts"]["onnx_data"] = onnx["files"][1]


def write_saved_model(forward, variables, input_shape, platforms, path) -> str:
    """Writes ``forward`` as a SavedModel at ``path`` (weights as ``tf.Variable``s, signature
    ``serving_default``) and returns the TensorFlow version."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    h, w, c = input_shape
    converted = jax2tf.convert(
        forward,
        polymorphic_shapes=[None, f"(b, {h}, {w}, {c})"],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(tf.Variable, variables)
    spec = tf.TensorSpec([None, h, w, c], tf.uint8, name="images")

    @tf.function(input_signature=[spec], autograph=False)
    def serve(images):
        return {"probabilities": converted(module.variables_tree, images)}

    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return tf.__version__


def _metadata(shape, class_names, mean, std, dtype, flip_tta, platforms, source, exported):
    """The content of ``export.json``."""
    return {
        "format": FORMAT,
        "input": {"name": "images", "shape": [None, *shape], "dtype": "uint8", "layout": "NHWC"},
        "output": {
            "name": "probabilities",
            "shape": [None, len(class_names)],
            "dtype": "float32",
        },
        "class_names": [str(n) for n in class_names],
        "normalization": {
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "formula": "(images / 255 - mean) / std",
        },
        "compute_dtype": str(jnp.dtype(dtype)),
        "flip_tta": bool(flip_tta),
        "platforms": list(platforms),
        "jax_version": jax.__version__,
        "jaxlib_version": _package_version("jaxlib"),
        "calling_convention_version": exported and exported.calling_convention_version,
        "step": None if source is None else source.get("step"),
        "source": source or {},
        "artifacts": {},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "compatibility": COMPATIBILITY,
    }


def describe(out, meta: dict) -> str:
    """A few lines saying what an export holds, file by file (printed by
    ``python -m cnnjax.export``)."""
    out = Path(out)
    shape = "x".join(map(str, meta["input"]["shape"][1:]))
    step = "" if meta["step"] is None else f" step {meta['step']}"
    platforms = ", ".join(meta["platforms"])
    kinds = {
        "stablehlo": f"StableHLO for JAX, lowered for {platforms}",
        "saved_model": f"TensorFlow SavedModel, lowered for {platforms}",
        "onnx": f"ONNX opset {meta.get('onnx', {}).get('opset')}",
        "onnx_data": "the ONNX model's weights",
    }
    lines = [
        f"exported{step}: uint8 (N, {shape}) -> {len(meta['class_names'])} class probabilities",
        *(f"  {out / name}  ({kinds[kind]})" for kind, name in meta["artifacts"].items()),
        f"  {out / METADATA_FILE}",
    ]
    return "\n".join(lines)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """An export loaded back from ``model.stablehlo``: call it on uint8 images (N, H, W, C)."""

    exported: jax.export.Exported
    metadata: dict

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["input"]["shape"][1:])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["class_names"])

    @property
    def platforms(self) -> tuple[str, ...]:
        return tuple(self.exported.platforms)

    @property
    def step(self) -> int | None:
        return self.metadata.get("step")

    def __call__(self, images) -> np.ndarray:
        """Probabilities (N, K) float32 of uint8 ``images`` (N, H, W, C).

        Raises:
          ConfigError: images of another shape or dtype.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ConfigError(f"images must be uint8 (0-255 pixels), got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ConfigError(f"images must be (N, {expected}); got {images.shape}")
        if not len(images):  # the symbolic batch is >= 1
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.asarray(self.exported.call(images))


def load(out) -> ExportedModel:
    """The StableHLO artifact of an export directory as a callable ``ExportedModel``.

    Raises:
      ExportError: not an export directory, or a missing, corrupt or mismatching artifact.
    """
    out = Path(out)
    meta_path = out / METADATA_FILE
    if not meta_path.is_file():
        raise ExportError(f"{out} is not a cnnjax export (no {METADATA_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        name = meta["artifacts"].get("stablehlo")
        expected = tuple(meta["input"]["shape"][1:])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{meta_path} is unreadable ({type(e).__name__}: {e})") from None
    if name is None:
        written = ", ".join(meta.get("formats", [])) or "none"
        raise ExportError(
            f"{out} has no StableHLO artifact (formats: {written}); export again with "
            "--format=stablehlo"
        )
    artifact = out / name
    if not artifact.is_file():
        raise ExportError(f"{artifact} is missing; export again with python -m cnnjax.export")
    exported = _deserialize(artifact)
    if tuple(exported.in_avals[0].shape[1:]) != expected:
        raise ExportError(f"{artifact} takes {exported.in_avals[0].shape}, not {expected} images")
    return ExportedModel(exported, meta)


def _deserialize(artifact: Path) -> jax.export.Exported:
    """``jax.export.deserialize`` of a file; a damaged one is one line."""
    data = bytearray(artifact.read_bytes())
    try:
        return jax.export.deserialize(data)
    except Exception as e:  # flatbuffer parsing of garbage fails with any error type
        text = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {text[0][:200] if text else ''}"
        raise ExportError(
            f"{artifact} is corrupt or from an incompatible jax ({detail}); export again"
        ) from None
