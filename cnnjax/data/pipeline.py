"""What both feeds (``data.feed``) share: ``DatasetInfo`` (a run's ``dataset.json``), the
roles' splits, the normalisation statistics, padded eval splits, and the on-device epoch order
and batch gathering of resident data. Every batch is the same dict (``image`` uint8
(N, H, W, C), ``label`` int32 (N,), and ``mask`` for evaluation); normalisation happens on the
device.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import ConfigError

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

    def to_json(self) -> str:
        """``dataset.json``'s text (``run.trained`` writes and reads the file)."""
        d = dataclasses.asdict(self)
        if d["preprocess"] is None:
            del d["preprocess"]  # dataset.json of runs from scratch: as before
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DatasetInfo":
        d = json.loads(text)
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
