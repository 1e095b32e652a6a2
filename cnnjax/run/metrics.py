"""Where metrics go: ``WORKDIR/metrics.jsonl`` (one JSON line per epoch), TensorBoard events in
``WORKDIR/tensorboard``, and a progress bar. Only process 0 writes."""

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import psutil

from cnnjax.run.workdir import REASONS, writing

# Prefixes of the loss and accuracy of each role: training batches, validation split, test split.
TRAIN, EVAL, TEST = "train", "eval", "test"
# The keys of every metrics.jsonl epoch line besides "epoch", so a checkpoint can be ranked by any
# of them (checkpointing.best_metric). Some lines have more: test_loss and test_accuracy (the last
# epoch, or every one with test_every_epoch), skipped_updates (skip_nonfinite > 0), mfu (where
# the device's peak is known); none of these can rank checkpoints.
EPOCH_METRICS = (
    f"{EVAL}_accuracy",
    f"{EVAL}_loss",
    f"{TRAIN}_accuracy",
    f"{TRAIN}_loss",
    "learning_rate",
    "step",
    "train_images_per_sec",
    "wall_s",
)


def wall_seconds() -> float:
    """Seconds since this process started (imports included): metrics.jsonl's ``wall_s``."""
    return time.time() - psutil.Process().create_time()


def prefix_of(role: str) -> str:
    """The metric prefix of an eval split's role: ``test`` for test, ``eval`` for validation."""
    return TEST if role == "test" else EVAL


def means(sums: dict, prefix: str) -> dict:
    """Metric sums (``loss``, ``correct``, ``count``) -> ``{prefix_loss, prefix_accuracy}``."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    return {
        f"{prefix}_loss": float(sums["loss"]) / count,
        f"{prefix}_accuracy": float(sums["correct"]) / count,
    }


def all_finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


class Writer:
    """Appends epoch lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """Drops lines of epochs after ``epoch`` (written before a crash, not checkpointed), so a
        resumed run does not log an epoch twice."""
        if not (self.enabled and self.path.exists()):
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
        with writing(self.path):
            self.path.write_text("".join(line + "\n" for line in kept))

    def scalars(self, step: int, values: dict) -> None:
        if self.enabled:
            for k, v in values.items():
                self._tb.add_scalar(k, float(np.asarray(v)), step)

    def epoch(self, line: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.scalars(line["step"], {k: v for k, v in line.items() if k not in ("epoch", "step")})
        with writing(self.path.parent / "tensorboard"):
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes TensorBoard's writer. On a full or unwritable disk the events it
        still buffers are dropped, so that tensorboardX's exit hook does not retry (and print a
        traceback after the run's one error line); the error is raised."""
        tb, self._tb = self._tb, None
        if tb is None:
            return
        try:
            with writing(self.path.parent / "tensorboard"):
                tb.close()
        except OSError as e:
            if e.errno in REASONS:
                _abandon(tb)
            raise


def _abandon(tb) -> None:
    """Marks a tensorboardX SummaryWriter's event writers closed, their thread stopped."""
    for file_writer in (getattr(tb, "all_writers", None) or {}).values():
        events = getattr(file_writer, "event_writer", None)
        worker = getattr(events, "_worker", None)
        if worker is not None:
            worker.stop()
        if events is not None:
            events._closed = True  # tensorboardX's own flag: its atexit close does nothing


def read_lines(workdir) -> list[dict]:
    """All epoch lines of a run's metrics.jsonl."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
