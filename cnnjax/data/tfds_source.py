"""A prepared TFDS dataset as a ``source.Source``, read without TensorFlow.

* ``split(name)``: random access through TFDS's data source (``builder.as_data_source``), which
  reads ArrayRecord files and decodes with numpy and PIL: TensorFlow is never imported. A dataset
  prepared in TFDS's older TFRecord format has no random access: re-prepare it.
* ``arrays(name)``: the whole split decoded, kept in a cache next to the prepared dataset
  (``cnnjax_arrays/<split>.npz`` in the builder's data_dir), so a later run reads one file.
  Without a cache the split is decoded through the data source; a TFRecord dataset without a
  cache is decoded once through TensorFlow, as before.

Split names are TFDS split strings, slices included (``train[:54000]``, ``train[54000:]``).
"""

import io
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cnnjax.data import source
from cnnjax.errors import DataUnavailableError

ARRAY_CACHE = "cnnjax_arrays"  # folder in a prepared dataset's data_dir with decoded splits


class TfdsSource:
    """A prepared TFDS builder as a ``Source`` (``source.Source``).

    Attributes:
      builder: the prepared ``tfds.core.DatasetBuilder``.
      name: the dataset's TFDS name.
      image_shape: (H, W, C) of every image (a dimension may be None where the dataset's
        images differ in size).
      class_names: the label names, in label order.
    """

    def __init__(self, builder):
        self.builder = builder
        self._image_key, self._label_key = builder.info.supervised_keys
        features = builder.info.features
        self.name = builder.info.name
        self.image_shape = tuple(features[self._image_key].shape)
        self.class_names = tuple(features[self._label_key].names)

    def split_sizes(self) -> dict[str, int]:
        """Examples of each split the dataset has."""
        return {name: s.num_examples for name, s in self.builder.info.splits.items()}

    def split(self, name: str) -> "TfdsSplit":
        """Random access to split ``name`` (a TFDS split string), without TensorFlow.

        Raises:
          DataUnavailableError: the dataset is prepared in a format without random access.
        """
        import tensorflow_datasets as tfds

        # The image's bytes, decoded by PIL here (as TFDS decodes without OpenCV, but without
        # its log line in every process, and in half the time).
        skip = {self._image_key: tfds.decode.SkipDecoding()}
        try:
            data_source = self.builder.as_data_source(name, decoders=skip)
        except NotImplementedError:
            raise DataUnavailableError(
                f"dataset {self.name} in {self.builder.data_dir} is prepared in the "
                f"{_file_format(self.builder)} format, which has no random access: "
                "re-prepare it in ArrayRecord format to stream it"
            ) from None
        return TfdsSplit(data_source, self._image_key, self._label_key)

    def arrays(self, name: str) -> dict:
        """Split ``name`` decoded: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,)."""
        return load_arrays(self.builder, name)


class TfdsSplit:
    """One split of a TFDS data source as a ``source.Split``: ``split[i]`` is
    ``{"image": uint8 (H, W, C), "label": int}`` (the dataset's supervised keys). Picklable, so
    Grain's worker processes can read it."""

    def __init__(self, data_source, image_key: str, label_key: str):
        self.data_source = data_source
        self.image_key = image_key
        self.label_key = label_key

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict:
        return self._supervised(self.data_source[index])

    def _getitems(self, indices) -> list[dict]:
        """Examples ``indices`` in one read (ArrayRecord reads them in parallel); Grain's
        ``MapDataset.source`` calls this to read a whole batch at once."""
        return [self._supervised(e) for e in self.data_source.__getitems__(list(indices))]

    def _supervised(self, example: dict) -> dict:
        return {
            "image": decode_image(example[self.image_key]),
            "label": int(example[self.label_key]),
        }


def decode_image(encoded: bytes) -> np.ndarray:
    """An encoded image (PNG, JPEG) as uint8 (H, W, C): what TFDS's ``decode_example_np``
    gives without OpenCV (PIL, grey images with a channel axis)."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        pixels = np.asarray(image, np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def load_arrays(builder, split: str, limit: int = 0) -> dict:
    """A whole split as host numpy: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,).

    The decoded arrays are kept next to the prepared dataset (``ARRAY_CACHE`` in the builder's
    data_dir), so later runs read one file instead of decoding every image again
    (Fashion-MNIST: ~12 s -> 0.1 s). A cache file that is unreadable or does not match the
    split is ignored and rewritten; an unwritable data_dir only skips the cache.

    Args:
      builder: a prepared TFDS builder.
      split: a TFDS split string.
      limit: if > 0, only the first ``limit`` examples of ``split``.
    """
    if limit:
        split = limit_split(builder, split, limit)
    path = array_cache_path(builder, split)
    arrays = _read_cached(path, builder, split)
    if arrays is not None:
        return arrays
    arrays = _decode(builder, split)
    _write_cached(path, arrays)
    return arrays


def _decode(builder, split: str) -> dict:
    """Every example of ``split``: through the data source (ArrayRecord, no TensorFlow), else
    through tf.data (a TFRecord dataset)."""
    try:
        data = TfdsSource(builder).split(split)
    except DataUnavailableError:
        return _decode_with_tensorflow(builder, split)
    return source.gather(data, range(len(data)))


def _decode_with_tensorflow(builder, split: str) -> dict:
    import tensorflow_datasets as tfds

    from cnnjax.data import tfds as tfds_lib

    tfds_lib.import_tensorflow()
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    image, label = tfds.as_numpy(ds)
    return {"image": image, "label": label.astype(np.int32)}


def _file_format(builder) -> str:
    file_format = builder.info.file_format
    return getattr(file_format, "value", str(file_format))


def array_cache_path(builder, split: str) -> Path:
    """Where ``load_arrays`` keeps the decoded ``split`` (a TFDS split string)."""
    return Path(builder.data_dir) / ARRAY_CACHE / (re.sub(r"[^\w-]", "_", split) + ".npz")


def _read_cached(path: Path, builder, split: str) -> dict | None:
    """The cached arrays of ``split``, or None when missing or not matching the dataset."""
    image_key, _ = builder.info.supervised_keys
    shape = tuple(builder.info.features[image_key].shape)
    n = builder.info.splits[split].num_examples
    try:
        with np.load(path, allow_pickle=False) as f:
            image, label = f["image"], f["label"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = image.shape == (n, *shape) and image.dtype == np.uint8
    ok = ok and label.shape == (n,) and label.dtype == np.int32
    return {"image": image, "label": label} if ok else None


def _write_cached(path: Path, arrays: dict) -> None:
    """Writes the cache atomically (a temporary file, then a rename): never a partial file."""
    tmp = None
    try:
        path.parent.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **arrays)
        tmp.chmod(0o644)  # like the dataset's own files (mkstemp makes 0600)
        tmp.replace(path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"not caching the decoded dataset in {path.parent}: {e}", stacklevel=2)


def limit_split(builder, split: str, limit: int) -> str:
    """``split`` cut to its first ``limit`` examples, as a TFDS split string
    (``source.limited``; TFDS counts the examples of a sliced split name)."""
    return source.limited(split, builder.info.splits[split].num_examples, limit)
