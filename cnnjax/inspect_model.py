"""Look inside a model: ``python -m cnnjax.inspect_model --workdir=DIR [--num-images=8]
[--images=a.png,b.png] [--layer=PATH] [--out=DIR]``, or a fresh model with ``--model=NAME
--input-shape=H,W,C``.

Writes gradients.csv, gradients.png, saliency.png, feature_maps.png, filters.png and
kernel_gradients.png into ``--out`` (default ``WORKDIR/inspection``) and prints the gradient
table. The library behind it is ``cnnjax.inspection``.
"""

from pathlib import Path

from absl import flags, logging

# cnnjax.predict (which restores a run for cnnjax.inspection) defines --workdir and --step when
# imported: import it first, so that the definitions below (allow_override=True) replace its
# own instead of being replaced by them halfway through main().
from cnnjax import cli, predict, runtime  # noqa: F401
from cnnjax.errors import ConfigError
from cnnjax.summary import parse_shape

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: restore its best checkpoint and read images from its data.",
    allow_override=True,
)
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step (default: the best checkpoint).", allow_override=True
)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split the images come from.")
_MODEL = flags.DEFINE_string("model", None, "Registry name of a fresh, randomly initialised model.")
_INPUT_SHAPE = flags.DEFINE_string("input_shape", "28,28,1", "Fresh model: image shape H,W,C.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Fresh model: number of classes.")
_IMAGES = flags.DEFINE_list("images", None, "Image files (comma-separated) instead of the data.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images taken from the split (or random).")
_LAYER = flags.DEFINE_string(
    "layer", None, "Layer path for feature maps and kernel gradients (default: the first conv)."
)
_CLASS_INDEX = flags.DEFINE_integer("class_index", None, "Saliency class (default: predicted).")
_TRAIN_MODE = flags.DEFINE_bool(
    "train_mode", False, "Gradients with batch statistics (as in training) instead of eval mode."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/inspection).")
_SEED = flags.DEFINE_integer("seed", 0, "Fresh model: init seed (and of random images).")
for _name in ("input_shape", "num_classes", "num_images", "class_index", "train_mode"):
    flags.DEFINE_alias(_name.replace("_", "-"), _name)


def output_dir() -> Path:
    """--out, else WORKDIR/inspection, else checkpoints/inspection_<model>."""
    if _OUT.value:
        return Path(_OUT.value)
    if _WORKDIR.value:
        return Path(_WORKDIR.value) / "inspection"
    return Path("checkpoints") / f"inspection_{_MODEL.value}"


def main(argv):
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager saves nothing
    runtime.configure_xla()
    runtime.enable_compilation_cache()
    from cnnjax import inspection

    try:
        shape = parse_shape(_INPUT_SHAPE.value)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    loaded = inspection.load_model(
        _WORKDIR.value, _MODEL.value, _NUM_CLASSES.value, shape, step=_STEP.value, seed=_SEED.value
    )
    images, labels = inspection.load_inputs(
        loaded, _IMAGES.value, _NUM_IMAGES.value, split=_SPLIT.value, seed=_SEED.value
    )
    out = output_dir()
    rows = inspection.write_report(
        loaded.model,
        loaded.variables,
        images,
        labels,
        out,
        layer=_LAYER.value,
        class_index=_CLASS_INDEX.value,
        class_names=loaded.info.class_names if loaded.info else None,
        train=_TRAIN_MODE.value,
    )
    print(inspection.format_table(rows))
    print(f"wrote gradients.csv and 5 PNGs to {out}")


if __name__ == "__main__":
    cli.run(main)
