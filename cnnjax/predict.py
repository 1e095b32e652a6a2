"""Classify image files with a trained run: ``python -m cnnjax.predict --workdir=DIR [--top_k=3]
[--json] [--step=N] IMAGE...``, or with torchvision's ImageNet weights:
``python -m cnnjax.predict --pretrained=resnet50 [--weights=TAG|FILE|URL] IMAGE...``.

Restores the best checkpoint (by validation accuracy) unless ``--step`` names one, converts each
PNG/JPEG to the size and channels the model was trained on, and prints its ``top_k`` classes
with their probabilities. A file that cannot be read gets a one-line ``error: FILE: reason`` on
stderr while the others are still predicted; the exit status is then 1. The library behind it
is ``cnnjax.tools.predict``.
"""

from absl import flags

from cnnjax import cli
from cnnjax.tools import predict as prediction

_WORKDIR = flags.DEFINE_string("workdir", "checkpoints/default", "Run directory to predict with.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Classes shown per image (at least 1).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON list instead of text.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A torchvision model name: its ImageNet classifier instead of a run."
)
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "With --pretrained: a tag (default DEFAULT), a .pth/.safetensors file or URL."
)


def main(argv):
    return prediction.report(
        _WORKDIR.value,
        argv[1:],
        _STEP.value,
        _TOP_K.value,
        _JSON.value,
        pretrained=_PRETRAINED.value,
        weights=_WEIGHTS.value,
    )


if __name__ == "__main__":
    cli.run(main)
