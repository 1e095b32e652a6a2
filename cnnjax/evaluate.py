"""Evaluate a trained run: ``python -m cnnjax.evaluate --workdir=DIR [--step=N]
[--split=test|validation]``.

Restores the best checkpoint (by validation accuracy) unless ``--step`` names one, prints loss,
accuracy and per-class accuracy, computed exactly as the trainer computes them, and writes
``WORKDIR/confusion_matrix.png``.
"""

from pathlib import Path

from absl import flags

from cnnjax import cli, plots, runtime

_WORKDIR = flags.DEFINE_string("workdir", "checkpoints/default", "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split to evaluate on.")


def main(argv):
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    runtime.configure_xla()
    from cnnjax import trainer  # after the XLA flags are set

    result = trainer.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _SPLIT.value)
    print(trainer.format_report(result))
    picture = Path(_WORKDIR.value) / "confusion_matrix.png"
    plots.plot_confusion_matrix(result["confusion"], result["class_names"], picture)
    print(f"confusion matrix: {picture}")


if __name__ == "__main__":
    cli.run(main)
