"""Dataset splits, normalisation statistics, and the two input paths.

* Resident: datasets that fit (MNIST, Fashion-MNIST, CIFAR...) are copied to the device once as
  uint8; each epoch's permutation is drawn on the device and every batch is gathered inside the
  jitted step, so training makes no host round-trip per step.
* Streaming: larger datasets go through tf.data (shuffle, batch, prefetch) and each process feeds
  its slice of the global batch.

Several processes (``cnnjax.distributed``): a resident split is small by definition, so every
process reads all of it and keeps one replica per local device (the global replicated sharding);
every process draws the same epoch order from the same key, and the gathered batch is
constrained to the batch sharding inside the jitted step, so XLA gathers on each device only
its own rows (checked in the compiled program: 8 rows per device for a batch of 32 on 4). A
streamed split is read as one TFDS shard per process (``ds.shard``), each process's batches
assembled into the global batch with ``jax.make_array_from_process_local_data``; every process
runs the same number of steps (``stream_batches``).

Both paths produce the same batch dict (``image`` uint8 (N, H, W, C), ``label`` int32 (N,)) for
the same train step; normalisation happens on the device.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data import tfds as tfds_lib
from cnnjax.data.tfds_source import (  # noqa: F401  (moved there; imported here by their users)
    ARRAY_CACHE,
    array_cache_path,
    limit_split,
    load_arrays,
)
from cnnjax.errors import ConfigError
from cnnjax.preprocessing import Preprocess
from cnnjax.workdir import write_text_atomic

STATS_SAMPLE = 10_000  # images used to estimate the per-channel mean and std


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the tools need to know about a dataset (saved as dataset.json)."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict  # role (train/validation/test) -> TFDS split string
    num_examples: dict  # role -> number of examples
    # How the model takes these images when it differs from normalising with mean/std (a run
    # from torchvision weights); None: normalisation with mean/std only.
    preprocess: Preprocess | None = None

    def save(self, path: Path) -> None:
        d = dataclasses.asdict(self)
        if d["preprocess"] is None:
            del d["preprocess"]  # dataset.json of runs from scratch: as before
        write_text_atomic(path, json.dumps(d, indent=2))

    @classmethod
    def load(cls, path: Path) -> "DatasetInfo":
        d = json.loads(Path(path).read_text())
        d["image_shape"] = tuple(d["image_shape"])
        preprocess = d.pop("preprocess", None)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d, preprocess=None if preprocess is None else Preprocess.from_dict(preprocess))


def split_names(split_sizes: dict, validation_fraction: float) -> dict:
    """Maps the roles train/validation/test to TFDS split strings.

    A dataset without a ``validation`` split gets one carved from the end of ``train``
    (``validation_fraction`` of it); with a fraction of 0 the test split stands in for validation.
    A dataset without ``test`` (e.g. ImageNet) is tested on its validation split.
    """
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {validation_fraction}")
    test = "test" if "test" in split_sizes else "validation"
    if "validation" in split_sizes and test != "validation":
        return {"train": "train", "validation": "validation", "test": test}
    n_val = int(round(split_sizes["train"] * validation_fraction))
    if n_val == 0:
        return {"train": "train", "validation": test, "test": test}
    n_train = split_sizes["train"] - n_val
    return {"train": f"train[:{n_train}]", "validation": f"train[{n_train}:]", "test": test}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), in [0, 1] units."""
    x = images[:STATS_SAMPLE].astype(np.float64) / 255.0
    return tuple(x.mean(axis=(0, 1, 2)).tolist()), tuple(
        np.maximum(x.std((0, 1, 2)), 1e-3).tolist()
    )


def stream_batches(
    builder,
    split: str,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    train: bool,
    image_size: int | None = None,
    limit: int = 0,
):
    """This process's batches of ``split`` as numpy dicts, through tf.data.

    Training batches are shuffled with a seed derived from ``(seed, epoch)`` (so a resumed epoch
    sees the same order) and the remainder is dropped; eval batches keep every example and carry
    a ``mask`` (the last batch is padded).
    """
    import tensorflow_datasets as tfds

    tf = tfds_lib.import_tensorflow()
    if limit:
        split = limit_split(builder, split, limit)
    read = tfds.ReadConfig(shuffle_seed=seed + epoch, interleave_cycle_length=4)
    ds = builder.as_dataset(split=split, shuffle_files=train, as_supervised=True, read_config=read)
    ds = ds.shard(jax.process_count(), jax.process_index())
    local = batch_size // jax.process_count()

    def prepare(image, label):
        if image_size:
            image = tf.cast(tf.image.resize(image, (image_size, image_size)), tf.uint8)
        return {"image": image, "label": tf.cast(label, tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if train:
        ds = ds.shuffle(10 * local, seed=seed + epoch).batch(local, drop_remainder=True)
        yield from tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))
        return
    batch = None
    for batch in tfds.as_numpy(ds.batch(local).prefetch(tf.data.AUTOTUNE)):
        yield pad_batch(batch, local)
    # Every process must run the same number of eval steps (each is a collective), but the
    # shards differ by up to one example: pad with fully masked batches up to the largest shard.
    n = builder.info.splits[split].num_examples
    mine = len(range(jax.process_index(), n, jax.process_count()))
    largest = -(-n // jax.process_count())
    if batch is None and largest:
        raise ConfigError(f"split {split} has {n} examples, fewer than the processes")
    for _ in range(-(-mine // local), -(-largest // local)):
        yield pad_batch({k: v[:0] for k, v in batch.items()}, local)


def pad_batch(batch: dict, size: int) -> dict:
    """Pads a (last, short) eval batch to ``size`` rows and adds the ``mask`` of real rows."""
    n = len(batch["label"])
    padded = {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    padded["mask"] = np.arange(size) < n
    return padded


def resident_eval_split(arrays: dict, batch_size: int) -> dict:
    """An eval split padded to a whole number of ``batch_size`` batches, with its ``mask``."""
    n = len(arrays["label"])
    return pad_batch(arrays, -(-n // batch_size) * batch_size)


def epoch_permutation(key: jax.Array, epoch: int, n: int) -> jax.Array:
    """The order of the ``n`` training examples in ``epoch``, drawn on the device."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def take_batch(split: dict, order: jax.Array, index, batch_size: int) -> dict:
    """Batch ``index`` of a device-resident split, in ``order`` (jit-friendly: the slice is
    dynamic, the size static)."""
    idx = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), split)


def slice_batch(split: dict, index, batch_size: int) -> dict:
    """Batch ``index`` of a device-resident split in stored order (evaluation)."""
    return jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, index * batch_size, batch_size), split
    )


def fits_in_memory(builder, mode: str, max_bytes: int) -> bool:
    """Whether the dataset should live on the device: ``mode`` yes/no, or auto by size (images
    of unknown size never do)."""
    if mode in ("yes", "no"):
        return mode == "yes"
    if mode != "auto":
        raise ConfigError(f"data.in_memory must be auto, yes or no; got {mode!r}")
    shape = builder.info.features[builder.info.supervised_keys[0]].shape
    if None in shape:
        return False
    total = sum(s.num_examples for s in builder.info.splits.values())
    return total * int(np.prod(shape)) <= max_bytes


def dataset_info(builder, roles: dict, mean, std, limit: int = 0) -> DatasetInfo:
    """Collects a builder's metadata into a DatasetInfo."""
    image_key, label_key = builder.info.supervised_keys
    features = builder.info.features
    label = features[label_key]
    counts = {role: builder.info.splits[s].num_examples for role, s in roles.items()}
    if limit:
        counts = {k: min(v, limit) for k, v in counts.items()}
    return DatasetInfo(
        name=builder.info.name,
        image_shape=tuple(features[image_key].shape),
        num_classes=label.num_classes,
        class_names=tuple(label.names),
        mean=tuple(mean),
        std=tuple(std),
        splits=dict(roles),
        num_examples=counts,
    )
