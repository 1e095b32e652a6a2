"""Look inside a model: ``python -m cnnjax.inspect_model --workdir=DIR [--num-images=8]
[--images=a.png,b.png] [--layer=PATH] [--cam_layer=PATH] [--class-index=K]
[--smoothgrad_samples=50] [--smoothgrad_noise=0.1] [--out=DIR]``, or a fresh model with
``--model=NAME --input-shape=H,W,C``.

Writes gradients.csv, gradients.png, saliency.png, grad_cam.png, smoothgrad.png,
feature_maps.png, filters.png and kernel_gradients.png into ``--out`` (default
``WORKDIR/inspection``) and prints the gradient table. The library behind it is
``cnnjax.tools.inspect``.
"""

from absl import flags

from cnnjax import cli
from cnnjax.tools import inspect as inspection

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: restore its best checkpoint and read images from its data."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split the images come from.")
_MODEL = flags.DEFINE_string("model", None, "Registry name of a fresh, randomly initialised model.")
_INPUT_SHAPE = flags.DEFINE_string("input_shape", "28,28,1", "Fresh model: image shape H,W,C.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Fresh model: number of classes.")
_IMAGES = flags.DEFINE_list("images", None, "Image files (comma-separated) instead of the data.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images taken from the split (or random).")
_LAYER = flags.DEFINE_string(
    "layer", None, "Layer path for feature maps and kernel gradients (default: the first conv)."
)
_CAM_LAYER = flags.DEFINE_string(
    "cam_layer", None, "Grad-CAM layer path, a 4-D output (default: the last conv block)."
)
_CLASS_INDEX = flags.DEFINE_integer(
    "class_index", None, "Class of the saliency, Grad-CAM and SmoothGrad maps (default: predicted)."
)
_SMOOTHGRAD_SAMPLES = flags.DEFINE_integer(
    "smoothgrad_samples", 50, "SmoothGrad: noisy copies averaged per image."
)
_SMOOTHGRAD_NOISE = flags.DEFINE_float(
    "smoothgrad_noise", 0.1, "SmoothGrad: noise std as a fraction of each image's value range."
)
_TRAIN_MODE = flags.DEFINE_bool(
    "train_mode", False, "Gradients with batch statistics (as in training) instead of eval mode."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/inspection).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of a fresh model's init, of random images and of SmoothGrad's noise."
)
for _name in (
    "input_shape",
    "num_classes",
    "num_images",
    "class_index",
    "train_mode",
    "cam_layer",
    "smoothgrad_samples",
    "smoothgrad_noise",
):
    flags.DEFINE_alias(_name.replace("_", "-"), _name)


def main(argv):
    cli.no_extra_args(argv)
    inspection.report(
        _WORKDIR.value,
        _MODEL.value,
        num_classes=_NUM_CLASSES.value,
        input_shape=cli.parse_shape(_INPUT_SHAPE.value),
        step=_STEP.value,
        seed=_SEED.value,
        image_files=_IMAGES.value,
        num_images=_NUM_IMAGES.value,
        split=_SPLIT.value,
        layer=_LAYER.value,
        class_index=_CLASS_INDEX.value,
        train=_TRAIN_MODE.value,
        out_dir=_OUT.value,
        cam_layer=_CAM_LAYER.value,
        smoothgrad_samples=_SMOOTHGRAD_SAMPLES.value,
        smoothgrad_noise=_SMOOTHGRAD_NOISE.value,
    )


if __name__ == "__main__":
    cli.run(main)
