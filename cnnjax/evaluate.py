"""Evaluate a trained run: ``python -m cnnjax.evaluate --workdir=DIR [--step=N]
[--split=test|validation]``.

Restores the best checkpoint (by validation accuracy) unless ``--step`` names one, and prints
loss, accuracy and per-class accuracy, computed exactly as the trainer computes them.
"""

import json
from pathlib import Path

import numpy as np
from absl import flags
from ml_collections import ConfigDict

from cnnjax import cli, runtime
from cnnjax.errors import CheckpointError

_WORKDIR = flags.DEFINE_string("workdir", "checkpoints/default", "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best checkpoint).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split to evaluate on.")


def load_run_config(workdir: Path) -> ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``)."""
    path = workdir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{workdir} is not a cnnjax run directory (no config.json)")
    return ConfigDict(json.loads(path.read_text()))


def evaluate_checkpoint(workdir, step: int | None = None, split: str = "test") -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint on ``split``."""
    from cnnjax import checkpoint, metrics, optim, trainer

    workdir = Path(workdir)
    config = load_run_config(workdir)
    run = trainer.setup(config, workdir)
    model = trainer.build_model(config, run.data.info.num_classes)
    tx, _ = optim.create_optimizer(config, run.steps_per_epoch)
    mngr = checkpoint.manager(workdir, read_only=True)
    step = mngr.best_step() if step is None else step
    state, meta = trainer.restore(run, mngr, model, tx, step)
    sums = trainer.eval_sums(run, state, split)
    confusion = np.asarray(sums["confusion"])
    return {
        "step": step,
        "epoch": meta["epoch"],
        "split": split,
        **metrics.means(sums, "test" if split == "test" else "eval"),
        "per_class_accuracy": (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist(),
        "class_names": list(run.data.info.class_names),
        "confusion": confusion.astype(int).tolist(),
    }


def format_report(result: dict) -> str:
    """A readable report of ``evaluate_checkpoint``'s result."""
    prefix = "test" if result["split"] == "test" else "eval"
    lines = [
        f"checkpoint step {result['step']} (epoch {result['epoch']}), split {result['split']}",
        f"loss {result[prefix + '_loss']:.4f}  accuracy {result[prefix + '_accuracy']:.4f}",
        "per-class accuracy:",
    ]
    for name, acc in zip(result["class_names"], result["per_class_accuracy"], strict=True):
        lines.append(f"  {name:<16} {acc:.4f}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    runtime.configure_xla()
    print(format_report(evaluate_checkpoint(_WORKDIR.value, _STEP.value, _SPLIT.value)))


if __name__ == "__main__":
    cli.run(main)
