"""Evaluation: the jitted eval step the trainer and ``python -m cnnjax.evaluate`` share, and
``evaluate_run``, which scores a trained run's checkpoint on one split.

Because both paths compile the same function over the same batches, the trainer's
``test_accuracy`` and ``evaluate_run``'s agree exactly for the same checkpoint and split.
"""

from collections.abc import Iterable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import plots
from cnnjax.data import pipeline, preprocessing
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import CheckpointError
from cnnjax.run import checkpoint
from cnnjax.run import metrics as metrics_lib
from cnnjax.train import parallel, steps

METRIC_KEYS = ("loss", "correct", "count")


def prepare_fn(info: pipeline.DatasetInfo, mesh, dtype):
    """``batch -> batch`` on the device: split over the mesh, uint8 images through the run's
    preprocessing (``preprocessing.of(info)``: normalised with the training statistics, or
    the pretrained weights' resize, channels and mean/std) into ``dtype``."""
    preprocess = preprocessing.of(info)
    to_batch_sharding = partial(
        jax.lax.with_sharding_constraint, shardings=parallel.batch_sharding(mesh)
    )

    def prepare(batch):
        batch = to_batch_sharding(batch)
        return {**batch, "image": preprocess.apply(batch["image"], dtype)}

    return prepare


def compile_eval(config, info: pipeline.DatasetInfo, mesh, resident: bool):
    """The jitted eval step, adding a batch's metric sums to ``acc`` (donated).

    Resident data: ``eval_fn(state, acc, split, i)`` slices batch ``i`` on the device;
    streaming: ``eval_fn(state, acc, batch)``.
    """
    prepare = prepare_fn(info, mesh, jnp.dtype(config.dtype))

    def add_eval_sums(state, acc, batch):
        sums = steps.eval_step(state, prepare(batch), flip_tta=config.flip_tta)
        return jax.tree.map(jnp.add, acc, sums)

    if not resident:
        return jax.jit(add_eval_sums, donate_argnums=1)
    ebs = config.data.eval_batch_size
    sliced = lambda s, a, split, i: add_eval_sums(s, a, pipeline.slice_batch(split, i, ebs))
    return jax.jit(sliced, donate_argnums=1)


def zero_sums(mesh, num_classes: int | None = None, train: bool = False) -> dict:
    """Fresh on-device metric sums (with a confusion matrix for evaluation; with
    ``steps.train_step``'s ``stop_step`` for training)."""
    zeros = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
    if num_classes:
        zeros["confusion"] = jnp.zeros((num_classes, num_classes), jnp.float32)
    if train:
        zeros["stop_step"] = jnp.array(steps.NO_STEP, jnp.int32)
    return jax.device_put(zeros, parallel.replicated(mesh))


def resident_batches(split: dict, batch_size: int) -> Iterable[tuple]:
    """The ``eval_fn`` arguments of a resident split (padded to whole batches)."""
    return ((split, i) for i in range(len(split["label"]) // batch_size))


def streamed_batches(config, builder, split: str, mesh) -> Iterable[tuple]:
    """The ``eval_fn`` arguments of a streamed split, each batch placed on the mesh."""
    d = config.data
    batches = pipeline.stream_batches(
        builder,
        split,
        d.eval_batch_size,
        seed=config.seed,
        epoch=0,
        train=False,
        image_size=d.image_size,
        limit=d.limit_examples,
    )
    return ((parallel.host_to_global(b, mesh),) for b in batches)


def eval_sums(eval_fn, state, batches: Iterable[tuple], mesh, num_classes: int) -> dict:
    """Metric sums and confusion matrix over ``batches``, every example counted once."""
    acc = zero_sums(mesh, num_classes)
    for args in batches:
        acc = eval_fn(state, acc, *args)
    return jax.device_get(acc)


def evaluate_run(workdir, step: int | None = None, split: str = "test") -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a run's checkpoint (default:
    the best) on ``split`` (``test`` or ``validation``), reading only that split.

    Raises:
      CheckpointError: not a run directory, or no such checkpoint.
      DataUnavailableError: the run's dataset is not available here.
    """
    run = checkpoint.load_run(workdir, step)
    c, mesh = run.config, parallel.make_mesh()
    builder = tfds_lib.builder(c.dataset, c.data.data_dir, c.data.local_dir, c.data.download)
    tfds_split = run.info.splits[split]
    resident = pipeline.fits_in_memory(builder, c.data.in_memory, c.data.in_memory_max_bytes)
    eval_fn = compile_eval(c, run.info, mesh, resident)
    if resident:
        arrays = pipeline.load_arrays(builder, tfds_split, c.data.limit_examples)
        padded = pipeline.resident_eval_split(arrays, c.data.eval_batch_size)
        padded = jax.device_put(padded, parallel.replicated(mesh))
        batches = resident_batches(padded, c.data.eval_batch_size)
    else:
        batches = streamed_batches(c, builder, tfds_split, mesh)
    sums = eval_sums(eval_fn, run.state, batches, mesh, run.info.num_classes)
    confusion = np.asarray(sums["confusion"])
    return {
        "step": run.step,
        "epoch": run.epoch,
        "split": split,
        **metrics_lib.means(sums, "test" if split == "test" else "eval"),
        "per_class_accuracy": (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist(),
        "class_names": list(run.info.class_names),
        "confusion": confusion.astype(int).tolist(),
    }


def format_report(result: dict) -> str:
    """A readable report of ``evaluate_run``'s result."""
    prefix = "test" if result["split"] == "test" else "eval"
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
