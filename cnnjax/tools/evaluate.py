"""``evaluate_run``: a trained run's checkpoint scored on one split (``python -m
cnnjax.evaluate``), with the eval step and batches training uses."""

from pathlib import Path

import numpy as np

from cnnjax import parallel, plots
from cnnjax.data import feed as feed_lib
from cnnjax.errors import CheckpointError
from cnnjax.run import metrics as metrics_lib
from cnnjax.run import trained
from cnnjax.train import eval_steps


def evaluate_run(workdir, step: int | None = None, split: str = "test") -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a run's checkpoint (default:
    the best) on ``split`` (``test`` or ``validation``), reading only that split.

    Raises:
      CheckpointError: not a run directory, or no such checkpoint.
      DataUnavailableError: the run's dataset is not available here.
    """
    run = trained.load_run(workdir, step)
    c, mesh = run.config, parallel.make_mesh()
    reading = feed_lib.Reading.of(c)
    feed = feed_lib.open_feed(reading, mesh, c.batch_size, info=run.info, roles=(split,))
    add_sums = eval_steps.add_eval_sums_fn(run.info, mesh, c.dtype, c.flip_tta)
    eval_fn = feed.compile_eval(add_sums)
    batches = feed.eval_batches(split)
    sums = eval_steps.eval_sums(eval_fn, run.state, batches, mesh, run.info.num_classes)
    confusion = np.asarray(sums["confusion"])
    return {
        "step": run.step,
        "epoch": run.epoch,
        "split": split,
        **metrics_lib.means(sums, metrics_lib.prefix_of(split)),
        "per_class_accuracy": (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist(),
        "class_names": list(run.info.class_names),
        "confusion": confusion.astype(int).tolist(),
    }


def format_report(result: dict) -> str:
    """A readable report of ``evaluate_run``'s result."""
    prefix = metrics_lib.prefix_of(result["split"])
    lines = [
        f"checkpoint step {result['step']} (epoch {result['epoch']}), split {result['split']}",
        f"loss {result[prefix + '_loss']:.4f}  accuracy {result[prefix + '_accuracy']:.4f}",
        "per-class accuracy:",
    ]
    for name, acc in zip(result["class_names"], result["per_class_accuracy"], strict=True):
        lines.append(f"  {name:<16} {acc:.4f}")
    return "\n".join(lines)


def report(workdir, step: int | None = None, split: str = "test") -> dict:
    """``evaluate_run``, printed, with ``WORKDIR/confusion_matrix.png`` written."""
    result = evaluate_run(workdir, step, split)
    print(format_report(result))
    picture = Path(workdir) / "confusion_matrix.png"
    try:
        plots.plot_confusion_matrix(result["confusion"], result["class_names"], picture)
    except OSError as e:  # a read-only or full run directory: the numbers are printed already
        raise CheckpointError(f"cannot write {picture}: {e.strerror or e}") from None
    print(f"confusion matrix: {picture}")
    return result
