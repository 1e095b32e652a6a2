"""Export a trained run for serving: ``python -m cnnjax.export --workdir=DIR [--step=N]
--out=OUT [--format=stablehlo,saved_model,onnx] [--platforms=cpu,cuda,rocm,tpu]``.

``--format`` chooses the artifacts (default ``stablehlo,saved_model``): ``OUT/model.stablehlo``
(a ``jax.export`` artifact, for JAX), ``OUT/saved_model/`` (a TensorFlow SavedModel, for TF
Serving and TFLite) and ``OUT/model.onnx`` (ONNX, for onnxruntime, TensorRT, OpenVINO and
browsers; needs ``bash setup.sh onnx``). ``OUT/export.json`` is always written. Each answers
uint8 images (N, H, W, C) with class probabilities, computed as ``python -m cnnjax.predict``
computes them. ``--nosaved_model`` (older scripts) leaves the SavedModel out of the default.
The library behind it is ``cnnjax.tools.export``.
"""

from absl import flags

from cnnjax import cli
from cnnjax.tools import export

_WORKDIR = flags.DEFINE_string("workdir", "checkpoints/default", "Run directory to export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the export into.", required=True)
_FORMAT = flags.DEFINE_list(
    "format",
    list(export.DEFAULT_FORMATS),
    f"Artifacts to write, some of {','.join(export.FORMATS)}.",
)
_PLATFORMS = flags.DEFINE_list(
    "platforms", list(export.PLATFORMS), "Platforms the StableHLO and SavedModel are lowered for."
)
_SAVED_MODEL = flags.DEFINE_bool(
    "saved_model", True, "--nosaved_model: the default formats without the SavedModel."
)


def main(argv):
    cli.no_extra_args(argv)
    formats = _FORMAT.value if flags.FLAGS["format"].present else None
    meta = export.export_run(
        _WORKDIR.value,
        _OUT.value,
        _STEP.value,
        formats=formats,
        platforms=tuple(_PLATFORMS.value),
        saved_model=_SAVED_MODEL.value,
    )
    print(export.describe(_OUT.value, meta))


if __name__ == "__main__":
    cli.run(main)
