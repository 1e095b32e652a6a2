"""cnnjax.run.metrics: sums become means once, on the host; metrics.jsonl lines are appended and
the lines of epochs after a resumed checkpoint are dropped."""

import json
import math

import jax.numpy as jnp
import numpy as np

from cnnjax.run import metrics
from cnnjax.train import steps


def test_means_divide_the_sums_by_the_count():
    sums = {"loss": jnp.float32(6.0), "correct": jnp.float32(3.0), "count": jnp.float32(4.0)}
    assert metrics.means(sums, "eval") == {"eval_loss": 1.5, "eval_accuracy": 0.75}
    empty = {"loss": 0.0, "correct": 0.0, "count": 0.0}  # no examples: zeros, not a NaN
    assert metrics.means(empty, "test") == {"test_loss": 0.0, "test_accuracy": 0.0}


def test_metric_sums_count_only_weighted_examples():
    logits = jnp.asarray([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = jnp.asarray([0, 0, 1])
    loss = steps.cross_entropy(logits, labels)
    sums = steps.metric_sums(logits, labels, loss, weights=jnp.asarray([1.0, 1.0, 0.0]))
    assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 1.0
    np.testing.assert_array_equal(sums["loss"], loss[0] + loss[1])


def test_all_finite_looks_at_float_values():
    assert metrics.all_finite({"epoch": 3, "loss": 0.5, "name": "x"})
    assert not metrics.all_finite({"epoch": 3, "loss": math.nan})
    assert not metrics.all_finite({"loss": math.inf})


def test_writer_appends_lines_and_truncates_after_a_resumed_epoch(tmp_path):
    writer = metrics.Writer(tmp_path)
    for epoch in (1, 2, 3):
        writer.epoch({"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch})
    writer.truncate_after(1)  # resumed from epoch 1's checkpoint: 2 and 3 are trained again
    writer.epoch({"epoch": 2, "step": 20, "train_loss": 0.25})
    writer.close()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == metrics.read_lines(tmp_path)
    assert [(x["epoch"], x["train_loss"]) for x in lines] == [(1, 1.0), (2, 0.25)]
    assert any((tmp_path / "tensorboard").iterdir())
    assert metrics.read_lines(tmp_path / "nowhere") == []
