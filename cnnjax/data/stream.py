"""Streamed batches of any ``Split`` through Grain: for datasets that do not fit on the device.

A ``Split`` is random access (``source.Split``), and so is every stage built on it here
(``grain.MapDataset``: shuffle, map, batch, slice), so any batch of any epoch is a pure function
of its position and reading starts wherever asked, without touching the batches before it.

Training (``train_batches``), epoch ``e`` of a run with ``seed``:

* Order: one global permutation of the split per epoch (Grain's ``shuffle``, a Feistel index
  shuffle, with a seed drawn from ``(seed, e)``); global batch ``i`` is the permuted examples
  ``i*B .. (i+1)*B - 1`` (the last ``len(split) % B`` are dropped).
* Processes: process ``p`` of ``P`` takes rows ``p*b .. (p+1)*b - 1`` of every global batch
  (``b = B // P``), so the union over processes of global batch ``i`` is the same set of examples
  whatever ``P`` is, and every process yields ``len(split) // B`` batches.
* Resume: ``first=k`` slices the batch dataset at ``k``; what follows is exactly the
  uninterrupted iterator's suffix.
* Host augmentation: ``map_fn(example, rng)`` gets a ``numpy.random.Generator`` seeded from
  ``(seed, e)`` and the example's position in the epoch (Grain's ``random_map``), so it does
  not depend on which process or worker computes it.
* Workers: batches are computed by ``workers`` processes (Grain's ``mp_prefetch``, each takes
  every ``workers``-th batch, the results are interleaved back in order) or, with 0, by threads
  of this process; either way ``prefetch`` batches are computed ahead, so the host prepares the
  next batches while the device runs. The batches are the same bits for any worker count.

Evaluation (``eval_batches``): every example once in stored order; global batch ``i`` is
examples ``i*B ..`` split over the processes as above, the last one padded with a ``mask`` of
real rows, so every process yields ``ceil(len(split) / B)`` batches. Its optional ``map_fn`` is
deterministic (``resize_center_crop``).

Every batch: ``image`` uint8 (b, H, W, C), ``label`` int32 (b,), and for evaluation ``mask``
bool (b,).
"""

import dataclasses
import math

import grain
import numpy as np

from cnnjax.data import source
from cnnjax.errors import ConfigError

PREFETCH = 4  # batches computed ahead in each process (memory: this many batches per process)


def train_batches(
    split,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    first: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    map_fn=None,
    prefetch: int = PREFETCH,
):
    """This process's training batches of epoch ``epoch``, from batch ``first`` on.

    Args:
      split: a ``source.Split`` (random access; picklable when ``workers`` > 0).
      batch_size: the global batch size B (divisible by ``process_count``).
      seed: the run's data seed (>= 0).
      epoch: the epoch (>= 0): with ``seed``, it fixes the order and ``map_fn``'s randomness.
      first: the first batch to yield (0 <= first <= len(split) // B), for a resumed epoch.
      process_index: this process, in [0, process_count).
      process_count: the number of processes feeding the global batch.
      workers: worker processes computing batches (0: threads of this process).
      map_fn: optional ``map_fn(example, rng) -> example``, run on every example before it is
        batched (in the workers), e.g. ``random_resized_crop_flip(224)``.
      prefetch: batches computed ahead by each process.

    Returns:
      An iterator over ``len(split) // B - first`` batches ``{"image": uint8 (b, H, W, C),
      "label": int32 (b,)}``, ``b = B // process_count``.

    Raises:
      ConfigError: B does not split over the processes, or the split has fewer than B examples.
    """
    local = _local_batch_size(batch_size, process_count, process_index)
    steps = len(split) // batch_size
    if steps == 0:
        raise ConfigError(
            f"the training split has {len(split)} examples, fewer than one batch of {batch_size}"
        )
    if not 0 <= first <= steps:
        raise ValueError(f"first={first} is outside the epoch's {steps} batches")
    shuffle_seed, map_seed = epoch_seeds(seed, epoch)
    ds = grain.MapDataset.source(split).shuffle(seed=shuffle_seed)[: steps * batch_size]
    if map_fn is not None:
        # After the slice: the generator's index is the example's position in the epoch.
        ds = ds.random_map(map_fn, seed=map_seed)
    ds = ds.map(_typed).batch(local, drop_remainder=True)
    # Local batch j covers epoch positions j*b ..: global batch i, rows of process p, is
    # local batch i*P + p.
    return _iterate(ds[process_index::process_count][first:], workers, prefetch)


def eval_batches(
    split,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    map_fn=None,
    prefetch: int = PREFETCH,
):
    """This process's evaluation batches: every example once, in stored order, masked.

    Args:
      split: a ``source.Split`` (picklable when ``workers`` > 0).
      batch_size: the global batch size B (divisible by ``process_count``).
      process_index: this process, in [0, process_count).
      process_count: the number of processes.
      workers: worker processes computing batches (0: threads of this process).
      map_fn: optional deterministic ``map_fn(example) -> example`` run on every example (in
        the workers), e.g. ``resize_center_crop(224)`` for images of any size.
      prefetch: batches computed ahead by each process.

    Returns:
      An iterator over ``ceil(len(split) / B)`` batches ``{"image": uint8 (b, H, W, C),
      "label": int32 (b,), "mask": bool (b,)}``; padding rows are zeros with ``mask`` False.

    Raises:
      ConfigError: B does not split over the processes, or the split is empty.
    """
    local = _local_batch_size(batch_size, process_count, process_index)
    if len(split) == 0:
        raise ConfigError("the evaluation split is empty")
    steps = -(-len(split) // batch_size)
    ds = grain.MapDataset.source(_Padded(split, steps * batch_size, map_fn)).batch(local)
    return _iterate(ds[process_index::process_count], workers, prefetch)


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """The 32-bit seeds of epoch ``epoch``'s order and of its ``map_fn`` generators.

    Drawn through ``numpy.random.SeedSequence`` (a hash), so nearby seeds and epochs give
    unrelated orders: (seed 1, epoch 0) is not (seed 0, epoch 1).
    """
    if seed < 0 or epoch < 0:
        raise ConfigError(f"the data seed and the epoch must be >= 0, got {seed} and {epoch}")
    shuffle_seed, map_seed = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle_seed), int(map_seed)


def _local_batch_size(batch_size: int, process_count: int, process_index: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(
            f"the batch size {batch_size} does not split over {process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return batch_size // process_count


def _typed(example: dict) -> dict:
    """The batch's types: ``image`` uint8 (H, W, C), ``label`` int32 (and ``mask`` if any)."""
    out = {"image": np.asarray(example["image"], np.uint8), "label": np.int32(example["label"])}
    if "mask" in example:
        out["mask"] = np.bool_(example["mask"])
    return out


class _Padded:
    """``split`` mapped by ``map_fn``, then zero examples with ``mask`` False up to ``length``
    (a ``Split``)."""

    def __init__(self, split, length: int, map_fn=None):
        self.split = split
        self.length = length
        self.map_fn = map_fn
        first = self[0]
        self.filler = {k: np.zeros_like(v) for k, v in first.items()}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index >= len(self.split):
            return self.filler
        example = self.split[index]
        if self.map_fn is not None:
            example = self.map_fn(example)
        return {**_typed(example), "mask": np.True_}


def _iterate(ds: grain.MapDataset, workers: int, prefetch: int):
    """Iterates ``ds`` (a MapDataset of batches) with ``prefetch`` batches computed ahead, in
    ``workers`` processes or, with 0, in as many threads of this one."""
    if workers < 0 or prefetch < 1:
        raise ConfigError(f"workers must be >= 0 and prefetch >= 1, got {workers}, {prefetch}")
    # Each thread computes whole batches; Grain returns them in order whatever finishes first.
    threads = prefetch if workers == 0 else 1
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    it = ds.to_iter_dataset(read)
    if workers:
        _absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        it = it.mp_prefetch(options)
    return _closing(iter(it))


def _absl_flags_parsed() -> None:
    """Grain's multiprocessing reads absl flags (``--grain_enable_multiprocess_worker_profiling``)
    and raises ``UnparsedFlagAccessError`` outside an absl app (a library call, a test): there,
    mark the flags as parsed, which leaves every flag at its default. An app that parses its
    flags later does so as usual."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _closing(iterator):
    """Yields from a Grain iterator and closes it (its worker processes) when done or dropped.

    A batch from a worker arrives in shared memory (``SharedMemoryArray``), released when the
    array is deleted, and not when it is still alive at interpreter exit (then leaked, with a
    warning): each is copied into an ordinary array and the shared block freed at once.
    """
    try:
        for batch in iterator:
            yield {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}
    finally:
        iterator.close()


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip:
    """Inception-style training crop: a random box of ``scale`` of the area and aspect ``ratio``
    (w / h, drawn log-uniformly), resized to ``size`` x ``size``, then a horizontal flip with
    probability 1/2. torchvision's ``RandomResizedCrop(size, scale, ratio)`` followed by
    ``RandomHorizontalFlip()`` on a PIL image, with a numpy generator instead of torch's: the same
    box distribution (``crop_box``) and the same pixels for a given box (PIL crop, then PIL
    bilinear resize, which antialiases when it shrinks).

    A ``map_fn`` for ``train_batches``: ``(example, rng) -> example``, ``image`` uint8 (H, W, C)
    of any size in, uint8 (size, size, C) out.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(example["image"])
        top, left, h, w = crop_box(rng, image.shape[0], image.shape[1], self.scale, self.ratio)
        out = resized_crop(image, top, left, h, w, self.size)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return {**example, "image": np.ascontiguousarray(out)}


def random_resized_crop_flip(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A ``RandomResizedCropFlip`` map_fn (see there); rejects bad parameters at once."""
    if size < 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(
            f"random_resized_crop_flip needs size >= 1, 0 < scale <= 1 and 0 < ratio, "
            f"increasing; got size={size}, scale={scale}, ratio={ratio}"
        )
    return RandomResizedCropFlip(size, tuple(scale), tuple(ratio))


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop:
    """The evaluation counterpart of ``RandomResizedCropFlip``: the shorter side resized to
    ``round(size / crop_fraction)``, then the central ``size`` x ``size`` (torchvision's
    ``Resize(round(size / crop_fraction))`` then ``CenterCrop(size)`` on a PIL image: 256 then
    224 for the default). A ``map_fn`` for ``eval_batches``: ``image`` uint8 (H, W, C) of any
    size in, uint8 (size, size, C) out."""

    size: int
    crop_fraction: float = 0.875

    def __call__(self, example: dict) -> dict:
        image = np.asarray(example["image"])
        h, w = image.shape[:2]
        short = round(self.size / self.crop_fraction)
        # torchvision's rounding: the longer side is truncated, the crop offset rounded.
        new_h, new_w = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
        top, left = round((new_h - self.size) / 2), round((new_w - self.size) / 2)
        out = source.resize(image, (new_h, new_w))[top : top + self.size, left : left + self.size]
        return {**example, "image": np.ascontiguousarray(out)}


def resize_center_crop(size: int, crop_fraction: float = 0.875):
    """A ``ResizeCenterCrop`` map_fn (see there); rejects bad parameters at once."""
    if size < 1 or not 0 < crop_fraction <= 1:
        raise ConfigError(
            f"resize_center_crop needs size >= 1 and 0 < crop_fraction <= 1; "
            f"got size={size}, crop_fraction={crop_fraction}"
        )
    return ResizeCenterCrop(size, crop_fraction)


def crop_box(
    rng: np.random.Generator, height: int, width: int, scale, ratio
) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, h, w)`` of an image ``height`` x ``width``:
    torchvision's ``RandomResizedCrop.get_params``, drawn with ``rng``.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect w / h in
    ``ratio``; when none fits, the largest central crop whose aspect is clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """``image[top:top+h, left:left+w]`` resized to (size, size) with PIL's bilinear filter.

    Args:
      image: uint8 (H, W, C), C = 1 or 3.

    Returns:
      uint8 (size, size, C).
    """
    return source.resize(image, (size, size), box=(left, top, left + w, top + h))
