"""Print a model's layer table: ``python -m cnnjax.summary --model=NAME
[--input-shape=224,224,3] [--num-classes=1000] [--batch-size=1] [--nocount-padding]``.

The library behind it is ``cnnjax.tools.summary``.
"""

from absl import flags

from cnnjax import cli, models
from cnnjax.tools import summary

_MODEL = flags.DEFINE_string("model", None, "Registered model name (see cnnjax.models.names()).")
_INPUT_SHAPE = flags.DEFINE_string("input_shape", "224,224,3", "Image shape H,W,C.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Batch size of the traced input (shapes only).")
_COUNT_PADDING = flags.DEFINE_bool(
    "count_padding", True, "Count conv taps on zero padding (the published way)."
)
flags.mark_flag_as_required("model")
for _name in ("input_shape", "num_classes", "batch_size", "count_padding"):
    flags.DEFINE_alias(_name.replace("_", "-"), _name)


def main(argv):
    cli.no_extra_args(argv)
    summary.summary(
        models.get(_MODEL.value, num_classes=_NUM_CLASSES.value),
        cli.parse_shape(_INPUT_SHAPE.value),
        batch_size=_BATCH_SIZE.value,
        count_padding=_COUNT_PADDING.value,
    )


if __name__ == "__main__":
    cli.run(main)
