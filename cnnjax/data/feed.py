"""Feeds: a dataset turned into what the compiled steps take, resident on the device or streamed
from the host, behind one interface. ``open_feed`` is the one place that chooses; the trainer,
evaluation, inspection and prediction use a feed without knowing which it is.

* ``ResidentFeed``: a dataset that fits is copied to the device once as uint8; each epoch's
  permutation is drawn on the device and every batch is gathered inside the jitted step, so
  training makes no host round-trip per step (several steps may run in one device loop).
* ``StreamedFeed``: every other dataset is read by the host in this process's shard, one batch
  per step, each process's rows assembled into the global batch.

A feed wraps the trainer's pure step functions into the jitted ones it can call
(``compile_train``, ``compile_eval``) and yields their arguments (``train_dispatches``,
``eval_batches``).
"""

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial

import jax

from cnnjax.data import pipeline
from cnnjax.data import tfds as tfds_lib
from cnnjax.train import parallel

# f(state, acc, batch) -> (state, acc): a train or eval step on one global batch
StepFn = Callable


@dataclasses.dataclass(frozen=True)
class Reading:
    """How a dataset is read: where it is, and its splits' sizes and batches."""

    dataset: str
    data_dir: str | None = None
    local_dir: str | None = None
    download: bool = True
    validation_fraction: float = 0.0
    in_memory: str = "auto"
    in_memory_max_bytes: int = 0
    image_size: int | None = None
    limit_examples: int = 0
    eval_batch_size: int = 1000
    seed: int = 0

    @classmethod
    def of(cls, config) -> "Reading":
        """The reading of a training config (its ``dataset``, ``seed`` and ``data.*``)."""
        d = config.data
        return cls(
            dataset=config.dataset,
            data_dir=d.data_dir,
            local_dir=d.local_dir,
            download=d.download,
            validation_fraction=d.validation_fraction,
            in_memory=d.in_memory,
            in_memory_max_bytes=d.in_memory_max_bytes,
            image_size=d.get("image_size"),
            limit_examples=d.limit_examples,
            eval_batch_size=d.eval_batch_size,
            seed=config.seed,
        )

    def builder(self):
        """The prepared TFDS builder."""
        return tfds_lib.builder(self.dataset, self.data_dir, self.local_dir, self.download)


def prepared_builder(reading: Reading):
    """The dataset's TFDS builder, prepared by process 0 before the other processes look (they
    would otherwise all download and convert it into the same data_dir at once)."""
    if jax.process_count() == 1:
        return reading.builder()
    from jax.experimental import multihost_utils

    builder = reading.builder() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("cnnjax: dataset prepared")
    return builder or reading.builder()


@dataclasses.dataclass
class ResidentFeed:
    """Splits held on the device: ``train`` as uint8 arrays, the eval splits padded to whole
    batches with their ``mask``."""

    info: pipeline.DatasetInfo
    mesh: jax.sharding.Mesh
    eval_batch_size: int
    train: dict | None
    evals: dict  # role -> padded device arrays

    def compile_train(self, train: StepFn, batch_size: int, per_dispatch: int):
        """``f(state, acc, split, order, start, stop)``: batches ``start .. stop - 1`` (at most
        ``per_dispatch``) of ``split`` in ``order``, each gathered on the device."""
        take = partial(pipeline.take_batch, batch_size=batch_size)
        if per_dispatch == 1:
            fn = lambda s, a, split, order, start, stop: train(s, a, take(split, order, start))
            return jax.jit(fn, donate_argnums=(0, 1))

        def train_range(state, acc, split, order, start, stop):
            # A device loop with dynamic bounds: one compilation for any number of steps, and
            # any split of an epoch into dispatches gives the same bits. Its body is compiled
            # apart from a standalone step, so it may round differently from per_dispatch ==
            # 1 (observed on XLA:CPU, whose convolutions also run far slower in a loop body:
            # jax-ml/jax#12868; hence auto is 1 there).
            body = lambda i, carry: train(*carry, take(split, order, i))
            return jax.lax.fori_loop(start, stop, body, (state, acc))

        return jax.jit(train_range, donate_argnums=(0, 1))

    def train_dispatches(self, key, epoch: int, ends: Iterator[int], first: int):
        """``(train_fn arguments, batch index after them)`` for the dispatches of ``epoch``
        from batch ``first`` to each of ``ends``."""
        order = pipeline.epoch_permutation(key, epoch, len(self.train["label"]))
        start = first
        for stop in ends:
            yield (self.train, order, start, stop), stop
            start = stop

    def compile_eval(self, add_sums: StepFn):
        ebs = self.eval_batch_size
        sliced = lambda s, a, split, i: add_sums(s, a, pipeline.slice_batch(split, i, ebs))
        return jax.jit(sliced, donate_argnums=1)

    def eval_batches(self, role: str):
        """The ``eval_fn`` arguments of split ``role`` (validation or test)."""
        split = self.evals[role]
        return ((split, i) for i in range(len(split["label"]) // self.eval_batch_size))


@dataclasses.dataclass
class StreamedFeed:
    """Splits read by the host one batch per step (``pipeline.stream_batches``)."""

    info: pipeline.DatasetInfo
    mesh: jax.sharding.Mesh
    reading: Reading
    builder: object
    batch_size: int

    def compile_train(self, train: StepFn, batch_size: int, per_dispatch: int):
        """``f(state, acc, batch)``: one step per dispatch (each batch comes from the host)."""
        del batch_size, per_dispatch
        return jax.jit(train, donate_argnums=(0, 1))

    def train_dispatches(self, key, epoch: int, ends: Iterator[int], first: int):
        """``((batch,), i + 1)`` for batches ``first ..`` of ``epoch`` (``ends`` is ignored:
        every dispatch is one step)."""
        del key, ends
        steps = self.info.num_examples["train"] // self.batch_size
        r = self.reading
        batches = pipeline.stream_batches(
            self.builder,
            self.info.splits["train"],
            self.batch_size,
            seed=r.seed,
            epoch=epoch,
            train=True,
            image_size=r.image_size,
            limit=r.limit_examples,
        )
        # Every process runs the same number of steps (each is a collective); its shard of n
        # examples holds at least n // batch_size batches of batch_size // processes. The rest
        # is read and dropped: an unfinished tf.data iterator would discard TFDS's cache with a
        # warning.
        for i, batch in enumerate(batches):
            if first <= i < steps:
                yield (parallel.host_to_global(batch, self.mesh),), i + 1

    def compile_eval(self, add_sums: StepFn):
        return jax.jit(add_sums, donate_argnums=1)

    def eval_batches(self, role: str):
        r = self.reading
        batches = pipeline.stream_batches(
            self.builder,
            self.info.splits[role],
            r.eval_batch_size,
            seed=r.seed,
            epoch=0,
            train=False,
            image_size=r.image_size,
            limit=r.limit_examples,
        )
        return ((parallel.host_to_global(b, self.mesh),) for b in batches)


Feed = ResidentFeed | StreamedFeed


def open_feed(reading: Reading, mesh, batch_size: int, info=None, roles=None) -> Feed:
    """Prepares the dataset and, when it fits, puts it on the device whole.

    Args:
      reading: where the dataset is and how to read it.
      mesh: the devices batches are placed on.
      batch_size: the global training batch.
      info: a trained run's ``DatasetInfo`` (its splits and statistics); None: derived here.
      roles: the eval splits a resident feed loads (default: validation and test; evaluating a
        run's checkpoint reads one, and no training split).
    """
    builder = prepared_builder(reading)
    limit = reading.limit_examples
    if info is None:
        sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
        splits = pipeline.split_names(sizes, reading.validation_fraction)
    else:
        splits = info.splits
    if not pipeline.fits_in_memory(builder, reading.in_memory, reading.in_memory_max_bytes):
        if info is None:
            stats = _streamed_stats(builder, splits["train"], reading.image_size)
            info = pipeline.dataset_info(builder, splits, *stats, limit)
        return StreamedFeed(info, mesh, reading, builder, batch_size)
    wanted = ("train", "validation", "test") if roles is None else ("train", *roles)
    if info is not None:
        wanted = wanted[1:]
    # Each distinct split once (validation and test may be the same split).
    loaded = {s: pipeline.load_arrays(builder, s, limit) for s in {splits[r] for r in wanted}}
    arrays = {role: loaded[splits[role]] for role in wanted}
    if info is None:
        stats = pipeline.channel_stats(arrays["train"]["image"])
        info = pipeline.dataset_info(builder, splits, *stats, limit)
    put = partial(jax.device_put, device=parallel.replicated(mesh))
    ebs = reading.eval_batch_size
    evals = {r: put(pipeline.resident_eval_split(arrays[r], ebs)) for r in wanted if r != "train"}
    train = put(arrays["train"]) if "train" in arrays else None
    return ResidentFeed(info, mesh, ebs, train, evals)


def _streamed_stats(builder, split: str, image_size):
    """Per-channel mean and std from a sample of the training split."""
    sample = next(
        pipeline.stream_batches(
            builder,
            split,
            pipeline.STATS_SAMPLE,
            seed=0,
            epoch=0,
            train=False,
            image_size=image_size,
        )
    )
    return pipeline.channel_stats(sample["image"])
