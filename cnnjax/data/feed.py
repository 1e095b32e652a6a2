"""Feeds: a dataset (a ``Source``) turned into what the compiled steps take, resident on the
device or streamed from the host, behind one interface. ``open_feed`` is the one place that
chooses; the trainer, evaluation and inspection use a feed without knowing which it is.

* ``ResidentFeed``: a dataset that fits is copied to the device once as uint8; each epoch's
  permutation is drawn on the device and every batch is gathered inside the jitted step, so
  training makes no host round-trip per step (several steps may run in one device loop).
* ``StreamedFeed``: every other dataset is read by the host through Grain (``data.stream``),
  this process's rows of each global batch, decoded in worker processes; the order is a
  function of (seed, epoch), so an epoch resumes at any batch.

A feed wraps the trainer's pure step functions into the jitted ones it can call
(``compile_train``, ``compile_eval``) and yields their arguments (``train_dispatches``,
``eval_batches``). Several processes (``cnnjax.distributed``): a resident split is small by
definition, so every process reads all of it and keeps one replica per local device, every
process draws the same epoch order from the same key, and the gathered batch is constrained to
the batch sharding inside the jitted step (XLA gathers on each device only its own rows); a
streamed split gives each process its rows, assembled into the global batch with
``jax.make_array_from_process_local_data``.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from functools import partial

import jax

from cnnjax import parallel
from cnnjax.data import pipeline, stream
from cnnjax.data import source as source_lib
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import ConfigError

FOLDER = "folder:"  # dataset = folder:PATH: a folder of images (data.folder)

# f(state, acc, batch) -> (state, acc): a train or eval step on one global batch
StepFn = Callable


@dataclasses.dataclass(frozen=True)
class Reading:
    """How a dataset is read: what and where it is, and its splits' sizes and batches."""

    dataset: str
    data_dir: str | None = None
    local_dir: str | None = None
    download: bool = True
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    in_memory: str = "auto"
    in_memory_max_bytes: int = 0
    image_size: int | None = None
    channels: int = 0
    limit_examples: int = 0
    eval_batch_size: int = 1000
    workers: int = 0
    seed: int = 0

    @classmethod
    def of(cls, config) -> "Reading":
        """The reading of a training config (its ``dataset``, ``seed`` and ``data.*``); keys
        a run of an older version did not have take their defaults."""
        d = config.data
        return cls(
            dataset=config.dataset,
            data_dir=d.data_dir,
            local_dir=d.local_dir,
            download=d.download,
            validation_fraction=d.validation_fraction,
            test_fraction=d.get("test_fraction", 0.0),
            in_memory=d.in_memory,
            in_memory_max_bytes=d.in_memory_max_bytes,
            image_size=d.get("image_size"),
            channels=d.get("channels", 0),
            limit_examples=d.limit_examples,
            eval_batch_size=d.eval_batch_size,
            workers=d.get("workers", 0),
            seed=config.seed,
        )


def open_source(reading: Reading) -> source_lib.Source:
    """The dataset of ``reading``: a folder of images (``folder:PATH``) or a prepared TFDS
    dataset (prepared by process 0 before the other processes look: they would otherwise all
    download and convert it into the same data_dir at once)."""
    if reading.dataset.startswith(FOLDER):
        return _open_folder(reading)
    from cnnjax.data import tfds_source

    r = reading
    make = lambda: tfds_lib.builder(r.dataset, r.data_dir, r.local_dir, r.download)
    if jax.process_count() == 1:
        return tfds_source.TfdsSource(make())
    from jax.experimental import multihost_utils

    builder = make() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("cnnjax: dataset prepared")
    return tfds_source.TfdsSource(builder or make())


@functools.lru_cache(maxsize=4)  # checked before the workdir is written, then opened in setup
def _open_folder(reading: Reading):
    from cnnjax.data import folder

    return folder.open_folder(
        reading.dataset[len(FOLDER) :],
        reading.image_size,
        reading.channels or None,
        reading.validation_fraction,
        reading.test_fraction,
        reading.seed,
        None if reading.data_dir is None else f"{reading.data_dir}/cnnjax_folders",
    )


def check_source(reading: Reading) -> None:
    """Opens a folder dataset, so that a bad folder is one line before anything is written
    (a TFDS dataset is checked where it is prepared, under the workdir's lock)."""
    if reading.dataset.startswith(FOLDER):
        _open_folder(reading)


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
    """Splits read by the host one batch per step, through Grain (``data.stream``)."""

    info: pipeline.DatasetInfo
    mesh: jax.sharding.Mesh
    splits: dict  # role -> source.Split, of one image shape
    batch_size: int
    eval_batch_size: int
    seed: int
    workers: int

    def compile_train(self, train: StepFn, batch_size: int, per_dispatch: int):
        """``f(state, acc, batch)``: one step per dispatch (each batch comes from the host)."""
        del batch_size, per_dispatch
        return jax.jit(train, donate_argnums=(0, 1))

    def train_dispatches(self, key, epoch: int, ends: Iterator[int], first: int):
        """``((batch,), i + 1)`` for batches ``first ..`` of ``epoch`` (``ends`` is ignored:
        every dispatch is one step)."""
        del key, ends
        batches = stream.train_batches(
            self.splits["train"],
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            first=first,
            workers=self.workers,
            **_processes(),
        )
        for i, batch in enumerate(batches, start=first):
            yield (parallel.host_to_global(batch, self.mesh),), i + 1

    def compile_eval(self, add_sums: StepFn):
        return jax.jit(add_sums, donate_argnums=1)

    def eval_batches(self, role: str):
        batches = stream.eval_batches(
            self.splits[role], self.eval_batch_size, workers=self.workers, **_processes()
        )
        return ((parallel.host_to_global(b, self.mesh),) for b in batches)


Feed = ResidentFeed | StreamedFeed


def _processes() -> dict:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def fits_in_memory(source: source_lib.Source, mode: str, max_bytes: int) -> bool:
    """Whether the dataset should live on the device: ``mode`` yes/no, or auto by size (images
    of unknown size never do)."""
    if mode in ("yes", "no"):
        return mode == "yes"
    if mode != "auto":
        raise ConfigError(f"data.in_memory must be auto, yes or no; got {mode!r}")
    if None in source.image_shape:
        return False
    return sum(source.split_sizes().values()) * math.prod(source.image_shape) <= max_bytes


def role_splits(source, validation_fraction: float, info) -> dict:
    """Role (train/validation/test) -> split string: a trained run's (``info``), else chosen by
    ``pipeline.split_names``."""
    if info is not None:
        return dict(info.splits)
    return pipeline.split_names(source.split_sizes(), validation_fraction)


def limited(source, specs: dict, limit: int) -> dict:
    """``specs`` cut to their first ``limit`` examples each (0: as they are)."""
    if not limit:
        return specs
    sizes = source.split_sizes()
    return {r: source_lib.limited(s, source_lib.count(s, sizes), limit) for r, s in specs.items()}


def open_feed(reading: Reading, mesh, batch_size: int, info=None, roles=None) -> Feed:
    """Opens the dataset and, when it fits, puts it on the device whole.

    Args:
      reading: what the dataset is and how to read it.
      mesh: the devices batches are placed on.
      batch_size: the global training batch.
      info: a trained run's ``DatasetInfo`` (its splits and statistics); None: derived here.
      roles: the eval splits a resident feed loads (default: validation and test; evaluating a
        run's checkpoint reads one, and no training split).
    """
    source = open_source(reading)
    specs = role_splits(source, reading.validation_fraction, info)
    read = limited(source, specs, reading.limit_examples)  # what is read of each split
    wanted = ("train", "validation", "test") if roles is None else ("train", *roles)
    if info is not None:
        wanted = wanted[1:]
    if not fits_in_memory(source, reading.in_memory, reading.in_memory_max_bytes):
        splits = {role: _streamed(source, read[role], reading.image_size) for role in wanted}
        if info is None:
            n = min(pipeline.STATS_SAMPLE, len(splits["train"]))
            sample = source_lib.gather(splits["train"], range(n))
            info = dataset_info(source, specs, read, *pipeline.channel_stats(sample["image"]))
        ebs, workers = reading.eval_batch_size, reading.workers
        return StreamedFeed(info, mesh, splits, batch_size, ebs, reading.seed, workers)
    # Each distinct split once (validation and test may be the same split).
    loaded = {spec: source.arrays(spec) for spec in {read[role] for role in wanted}}
    arrays = {role: loaded[read[role]] for role in wanted}
    if info is None:
        stats = pipeline.channel_stats(arrays["train"]["image"])
        info = dataset_info(source, specs, read, *stats)
    put = partial(jax.device_put, device=parallel.replicated(mesh))
    ebs = reading.eval_batch_size
    evals = {r: put(pipeline.resident_eval_split(arrays[r], ebs)) for r in wanted if r != "train"}
    train = put(arrays["train"]) if "train" in arrays else None
    return ResidentFeed(info, mesh, ebs, train, evals)


def _streamed(source, spec: str, image_size: int | None) -> source_lib.Split:
    """Split ``spec`` for streaming, its images resized to ``image_size`` when the dataset's
    differ in size (a folder source resizes its own; such a dataset is never resident)."""
    split = source.split(spec)
    if None in source.image_shape:
        if not image_size:
            raise ConfigError(
                f"dataset {source.name} has images of different sizes {source.image_shape}: "
                "set --config.data.image_size to stream it"
            )
        split = source_lib.Resized(split, image_size)
    return split


def dataset_info(source, specs: dict, read: dict, mean, std) -> pipeline.DatasetInfo:
    """A source's metadata as a ``DatasetInfo``: the roles' ``specs`` and the number of
    examples ``read`` of each, with the training statistics."""
    sizes = source.split_sizes()
    return pipeline.DatasetInfo(
        name=source.name,
        image_shape=tuple(source.image_shape),
        num_classes=len(source.class_names),
        class_names=tuple(source.class_names),
        mean=tuple(mean),
        std=tuple(std),
        splits=dict(specs),
        num_examples={role: source_lib.count(spec, sizes) for role, spec in read.items()},
    )


def first_examples(reading: Reading, spec: str, count: int) -> dict:
    """The first ``count`` examples of split ``spec`` as host numpy (``image`` uint8, ``label``
    int32) as training read them, without reading the rest: what the pictures of a run show."""
    source = open_source(reading)
    split = _streamed(source, spec, reading.image_size)  # resident data: the same examples
    return source_lib.gather(split, range(min(count, len(split))))
