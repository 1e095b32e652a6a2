"""The eval step the trainer and ``python -m cnnjax.evaluate`` share, and metric sums over a
feed's batches.

Because both paths compile the same function over the same batches, the trainer's
``test_accuracy`` and ``tools.evaluate.evaluate_run``'s agree exactly for the same checkpoint
and split.
"""

from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp

from cnnjax import parallel
from cnnjax.data import pipeline, preprocessing
from cnnjax.train import steps

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


def add_eval_sums_fn(info: pipeline.DatasetInfo, mesh, dtype, flip_tta: bool):
    """``add_eval_sums(state, acc, batch) -> acc``: a batch's metric sums added to ``acc``, for
    a feed to jit (``feed.compile_eval``)."""
    prepare = prepare_fn(info, mesh, jnp.dtype(dtype))

    def add_eval_sums(state, acc, batch):
        sums = steps.eval_step(state, prepare(batch), flip_tta=flip_tta)
        return jax.tree.map(jnp.add, acc, sums)

    return add_eval_sums


def zero_sums(mesh, num_classes: int | None = None, train: bool = False) -> dict:
    """Fresh on-device metric sums (with a confusion matrix for evaluation; with
    ``steps.train_step``'s ``stop_step`` for training)."""
    zeros = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
    if num_classes:
        zeros["confusion"] = jnp.zeros((num_classes, num_classes), jnp.float32)
    if train:
        zeros["stop_step"] = jnp.array(steps.NO_STEP, jnp.int32)
    return jax.device_put(zeros, parallel.replicated(mesh))


def eval_sums(eval_fn, state, batches: Iterable[tuple], mesh, num_classes: int) -> dict:
    """Metric sums and confusion matrix over ``batches``, every example counted once."""
    acc = zero_sums(mesh, num_classes)
    for args in batches:
        acc = eval_fn(state, acc, *args)
    return jax.device_get(acc)
