"""Evaluate a trained run: ``python -m cnnjax.evaluate --workdir=DIR [--step=N]
[--split=test|validation]``.

Restores the best checkpoint (by validation accuracy) unless ``--step`` names one, prints loss,
accuracy and per-class accuracy, computed exactly as the trainer computes them, and writes
``WORKDIR/confusion_matrix.png``. The library behind it is ``cnnjax.train.eval_steps``.
"""

from absl import flags

from cnnjax import cli
from cnnjax.tools import evaluate as evaluation

_WORKDIR = flags.DEFINE_string("workdir", "checkpoints/default", "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split to evaluate on.")


def main(argv):
    cli.no_extra_args(argv)
    evaluation.report(_WORKDIR.value, _STEP.value, _SPLIT.value)


if __name__ == "__main__":
    cli.run(main)
