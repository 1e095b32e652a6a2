"""Export a trained run for serving: ``python -m cnnjax.export --workdir=DIR [--step=N]
--out=OUT [--platforms=cpu,cuda,rocm,tpu] [--nosaved_model]``.

Writes ``OUT/model.stablehlo`` (a ``jax.export`` artifact), ``OUT/saved_model/`` (a TensorFlow
SavedModel) and ``OUT/export.json``: uint8 images (N, H, W, C) in, class probabilities out,
computed as ``python -m cnnjax.predict`` computes them. The library behind it is
``cnnjax.export``.
"""

from absl import flags

from cnnjax import cli, export

_WORKDIR = flags.DEFINE_string("workdir", "checkpoints/default", "Run directory to export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the export into.", required=True)
_PLATFORMS = flags.DEFINE_list(
    "platforms", list(export.PLATFORMS), "Platforms the artifacts are lowered for."
)
_SAVED_MODEL = flags.DEFINE_bool("saved_model", True, "Also write a TensorFlow SavedModel.")


def main(argv):
    cli.no_extra_args(argv)
    meta = export.export_run(
        _WORKDIR.value,
        _OUT.value,
        _STEP.value,
        platforms=tuple(_PLATFORMS.value),
        saved_model=_SAVED_MODEL.value,
    )
    print(export.describe(_OUT.value, meta))


if __name__ == "__main__":
    cli.run(main)
