"""Streamed batches through Grain (``cnnjax.data.stream``) and the TFDS source read without
TensorFlow (``cnnjax.data.tfds_source``)."""

import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cnnjax.data import stream, tfds_source
from cnnjax.data.source import gather
from cnnjax.errors import ConfigError, DataUnavailableError

ROOT = Path(__file__).resolve().parents[1]


class ArraySplit:
    """An in-memory ``Split``: example i has label i and an image that encodes i; it records
    which examples were read."""

    def __init__(self, n: int, shape=(4, 3, 1)):
        self.n, self.shape = n, shape
        self.reads = []
        self._lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        with self._lock:
            self.reads.append(index)
        image = np.full(self.shape, index % 256, np.uint8)
        image[0, 0, 0] = index // 256
        return {"image": image, "label": index}

    def __getstate__(self):  # pickled into Grain's workers without the lock
        return {"n": self.n, "shape": self.shape, "reads": []}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


def labels(batches) -> np.ndarray:
    """The labels of ``batches`` stacked: (num_batches, batch)."""
    return np.stack([b["label"] for b in batches])


def test_order_is_a_pure_function_of_seed_and_epoch():
    split = ArraySplit(50)
    order = labels(stream.train_batches(split, 8, seed=3, epoch=0))
    assert order.shape == (6, 8)  # 50 // 8 batches, the last 2 examples dropped
    assert len(set(order.ravel())) == 48  # no example twice in an epoch
    np.testing.assert_array_equal(order, labels(stream.train_batches(split, 8, seed=3, epoch=0)))
    others = [labels(stream.train_batches(split, 8, seed=s, epoch=e)) for s, e in [(3, 1), (4, 0)]]
    for other in others:
        assert not np.array_equal(other, order)
    # Seeds and epochs are hashed together: (seed 4, epoch 0) is not (seed 3, epoch 1).
    assert not np.array_equal(*others)
    batch = next(iter(stream.train_batches(split, 8, seed=3, epoch=0)))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 4, 3, 1)
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][:, 1, 1, 0], batch["label"] % 256)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_are_disjoint_rows_of_the_same_global_batches(processes):
    split = ArraySplit(70)
    whole = labels(stream.train_batches(split, 16, seed=0, epoch=2))
    shards = [
        labels(
            stream.train_batches(
                split, 16, seed=0, epoch=2, process_index=p, process_count=processes
            )
        )
        for p in range(processes)
    ]
    assert all(s.shape == (70 // 16, 16 // processes) for s in shards)  # same count everywhere
    # Process p holds rows p*b .. (p+1)*b - 1 of every global batch.
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), whole)


def test_first_k_yields_the_uninterrupted_suffix_without_reading_earlier_batches():
    whole = labels(stream.train_batches(ArraySplit(100), 12, seed=1, epoch=5))
    for k in (0, 3, 7):
        split = ArraySplit(100)
        rest = labels(stream.train_batches(split, 12, seed=1, epoch=5, first=k))
        np.testing.assert_array_equal(rest, whole[k:])
        assert sorted(split.reads) == sorted(whole[k:].ravel())  # read once, only these
    assert list(stream.train_batches(ArraySplit(100), 12, seed=1, epoch=5, first=8)) == []
    with pytest.raises(ValueError, match="outside the epoch"):
        stream.train_batches(ArraySplit(100), 12, seed=1, epoch=5, first=9)


def test_map_fn_randomness_depends_on_seed_epoch_and_position_only():
    def draw(example, rng):
        return {**example, "image": rng.integers(0, 256, (2, 2, 1), dtype=np.uint8)}

    def drawn(seed, epoch, **kwargs):
        """Example id -> the pixels its map_fn drew."""
        batches = stream.train_batches(
            ArraySplit(40), 8, seed=seed, epoch=epoch, map_fn=draw, **kwargs
        )
        return {int(y): b["image"][i].tobytes() for b in batches for i, y in enumerate(b["label"])}

    reference = drawn(0, 0)
    assert drawn(0, 0) == reference
    # The same draws whatever the process split, and on a resumed epoch.
    shards = [drawn(0, 0, process_index=p, process_count=2) for p in (0, 1)]
    assert {**shards[0], **shards[1]} == reference
    resumed = drawn(0, 0, first=3)
    assert resumed == {k: reference[k] for k in resumed} and len(resumed) == 2 * 8
    for other in (drawn(0, 1), drawn(1, 0)):
        assert not any(other[k] == reference[k] for k in reference)  # 4 random bytes each


@pytest.mark.slow
def test_worker_processes_give_the_same_bits_as_in_process():
    """Also checks that a worker's batches (shared memory) come back as ordinary arrays."""
    split = ArraySplit(45, shape=(20, 16, 3))
    crop = stream.random_resized_crop_flip(8)
    runs = {
        w: list(stream.train_batches(split, 6, seed=2, epoch=1, workers=w, map_fn=crop))
        for w in (0, 2)
    }
    runs["eval"] = list(stream.eval_batches(split, 6, workers=2))
    assert len(runs[0]) == len(runs[2]) == 7
    for a, b in zip(runs[0], runs[2], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert type(b[k]) is np.ndarray and b[k].dtype == a[k].dtype
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(stream.eval_batches(split, 6), runs["eval"], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_eval_covers_every_example_once_in_order_with_a_mask(processes):
    split = ArraySplit(23)
    shards = [
        list(stream.eval_batches(split, 8, process_index=p, process_count=processes))
        for p in range(processes)
    ]
    assert [len(s) for s in shards] == [math.ceil(23 / 8)] * processes
    rows = 8 // processes
    for p, shard in enumerate(shards):
        for i, batch in enumerate(shard):
            assert batch["mask"].dtype == bool and batch["label"].shape == (rows,)
            positions = i * 8 + p * rows + np.arange(rows)  # rows of global batch i
            np.testing.assert_array_equal(batch["mask"], positions < 23)
            np.testing.assert_array_equal(batch["label"][batch["mask"]], positions[positions < 23])
            assert not batch["image"][~batch["mask"]].any()  # padding is zeros
            assert not batch["label"][~batch["mask"]].any()


class VariedSplit:
    """Images of different sizes (as a folder of photos): example i is (10 + i) x (30 - i)."""

    def __len__(self):
        return 7

    def __getitem__(self, index):
        image = np.full((10 + index, 30 - index, 3), 10 * index, np.uint8)
        return {"image": image, "label": index}


def test_eval_map_fn_makes_images_of_any_size_one_batch_shape():
    batches = list(stream.eval_batches(VariedSplit(), 4, map_fn=stream.resize_center_crop(8)))
    assert [b["image"].shape for b in batches] == [(4, 8, 8, 3)] * 2
    np.testing.assert_array_equal(batches[1]["mask"], [True, True, True, False])
    np.testing.assert_array_equal(batches[1]["image"][:3, 0, 0, 0], [40, 50, 60])  # flat images
    assert not batches[1]["image"][3].any()


def test_batches_that_do_not_split_over_processes_or_an_epoch_without_a_batch_are_refused():
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        stream.train_batches(ArraySplit(50), 8, seed=0, epoch=0, process_count=3)
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        stream.eval_batches(ArraySplit(50), 8, process_count=3)
    with pytest.raises(ConfigError, match="fewer than one batch of 64"):
        stream.train_batches(ArraySplit(50), 64, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="size >= 1"):
        stream.random_resized_crop_flip(224, scale=(0.5, 0.1))
    with pytest.raises(ConfigError, match="crop_fraction <= 1"):
        stream.resize_center_crop(224, crop_fraction=1.5)


def _ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.slow  # imports torch and torchvision (seconds)
@pytest.mark.parametrize("height, width", [(375, 500), (40, 400)])
def test_crop_boxes_are_distributed_as_torchvision_draws_them(height, width):
    """Our boxes (numpy) against torchvision's ``RandomResizedCrop.get_params`` (torch's
    generator): area fraction, aspect ratio and position. (40, 400) is too wide for the aspect
    range: some draws fail all 10 tries and take the central fallback."""
    import torch
    from torchvision_models import import_torchvision

    transforms = import_torchvision().transforms
    n, scale, ratio = 2000, (0.08, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    ours = np.array([stream.crop_box(rng, height, width, scale, ratio) for _ in range(n)], float)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array(
        [transforms.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)], float
    )
    # Two samples of n from one distribution: P(KS > 1.95 * sqrt(2 / n)) < 0.001.
    bound = 1.95 * math.sqrt(2 / n)
    for name, stat in {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "aspect": lambda b: b[:, 3] / b[:, 2],
        "top": lambda b: b[:, 0],
        "left": lambda b: b[:, 1],
    }.items():
        assert _ks_statistic(stat(ours), stat(theirs)) < bound, name
    h, w = ours[:, 2], ours[:, 3]
    assert (h >= 1).all() and (ours[:, 0] + h <= height).all() and (ours[:, 1] + w <= width).all()


@pytest.mark.slow  # imports torch and torchvision (seconds)
def test_random_resized_crop_flip_is_torchvision_pixels_for_the_same_box_and_flip():
    from PIL import Image
    from torchvision_models import import_torchvision

    functional = import_torchvision().transforms.functional
    image = np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    crop = stream.random_resized_crop_flip(24)
    flips = 0
    for position in range(40):
        out = crop({"image": image, "label": 7}, np.random.default_rng(position))
        rng = np.random.default_rng(position)  # the same draws, replayed
        top, left, h, w = stream.crop_box(rng, 61, 83, crop.scale, crop.ratio)
        flip = rng.random() < 0.5
        expected = functional.resized_crop(Image.fromarray(image), top, left, h, w, [24, 24])
        if flip:
            expected = functional.hflip(expected)
        assert out["label"] == 7 and out["image"].dtype == np.uint8
        np.testing.assert_array_equal(out["image"], np.asarray(expected))
        flips += flip
    assert 0 < flips < 40
    gray = crop({"image": image[..., :1], "label": 0}, np.random.default_rng(0))["image"]
    assert gray.shape == (24, 24, 1) and gray.dtype == np.uint8


@pytest.mark.slow  # imports torch and torchvision (seconds)
def test_resize_center_crop_is_torchvision_resize_then_center_crop():
    from PIL import Image
    from torchvision_models import import_torchvision

    transforms = import_torchvision().transforms
    rng = np.random.default_rng(2)
    for height, width in [(375, 500), (500, 333), (240, 240), (97, 131)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
        out = stream.resize_center_crop(224)({"image": image, "label": 3})
        np.testing.assert_array_equal(out["image"], np.asarray(expected(Image.fromarray(image))))
        assert out["label"] == 3


# ------------------------------------------------------------------------ TFDS without TensorFlow


def _tiny_builder_class():
    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """40 training and 13 test images of 6x5x3 pixels in 3 classes, random."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 5, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self, features=features, supervised_keys=("image", "label")
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 40), "test": self._generate_examples(1, 13)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                yield i, {"image": image, "label": int(rng.integers(3))}

    return TinyImages


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """The same tiny dataset prepared twice: ArrayRecord (random access) and TFRecord (what
    tf.data reads, the reference; TFDS has no tf.data reader for ArrayRecord)."""
    from cnnjax.data import tfds as tfds_lib

    tfds_lib.import_tensorflow()  # preparing writes through TensorFlow
    cls = _tiny_builder_class()
    builders = {}
    for file_format in ("array_record", "tfrecord"):
        builder = cls(data_dir=str(tmp_path_factory.mktemp(file_format)), file_format=file_format)
        builder.download_and_prepare()
        builders[file_format] = builder
    return builders


@pytest.mark.slow  # the fixture imports TensorFlow to prepare the dataset twice
def test_tfds_source_reads_what_tf_data_reads(tiny_tfds):
    import tensorflow_datasets as tfds

    source = tfds_source.TfdsSource(tiny_tfds["array_record"])
    assert source.image_shape == (6, 5, 3) and source.class_names == ("a", "b", "c")
    assert source.split_sizes() == {"train": 40, "test": 13}
    for name in ("test", "train[5:20]", "train[30:]"):
        ds = tiny_tfds["tfrecord"].as_dataset(split=name, batch_size=-1, as_supervised=True)
        image, label = tfds.as_numpy(ds)
        split = source.split(name)
        assert len(split) == len(label)
        streamed = gather(split, range(len(split)))
        arrays = source.arrays(name)
        for got in (streamed, arrays, source.arrays(name)):  # the last from the cache
            np.testing.assert_array_equal(got["image"], image)
            np.testing.assert_array_equal(got["label"], label)
            assert got["image"].dtype == np.uint8 and got["label"].dtype == np.int32
        assert tfds_source.array_cache_path(source.builder, name).is_file()


@pytest.mark.slow  # the fixture
def test_a_tfrecord_dataset_cannot_stream_but_its_arrays_still_load(tiny_tfds):
    source = tfds_source.TfdsSource(tiny_tfds["tfrecord"])
    with pytest.raises(DataUnavailableError) as e:
        source.split("train")
    assert "tfrecord format" in str(e.value) and "re-prepare it in ArrayRecord" in str(e.value)
    assert "\n" not in str(e.value)
    assert source.arrays("train[:7]")["image"].shape == (7, 6, 5, 3)  # decoded with TensorFlow


NO_TENSORFLOW = """
import numpy as np
import tensorflow_datasets as tfds
from cnnjax.data import stream, tfds_source

class Memory:
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"image": np.full((2, 2, 1), i, np.uint8), "label": i}

def tensorflow_imported(example, rng):
    # In a worker process (spawned, without the block above): report there as a label.
    return {**example, "label": int("tensorflow" in sys.modules)}

source = tfds_source.TfdsSource(tfds.builder_from_directory(sys.argv[1]))
assert source.arrays("train[:5]")["image"].shape == (5, 6, 5, 3)  # decoded, no cache yet
split = source.split("train[:30]")
crop = stream.random_resized_crop_flip(4)
train = list(stream.train_batches(split, 8, seed=0, epoch=0, map_fn=crop))
evaluation = list(stream.eval_batches(source.split("test"), 8))
memory = list(stream.train_batches(Memory(), 4, seed=0, epoch=0))
worker = stream.train_batches(split, 8, seed=0, epoch=0, workers=1, map_fn=tensorflow_imported)
worker = list(worker)
assert "tensorflow" not in sys.modules, "imported"
assert not np.concatenate([b["label"] for b in worker]).any(), "imported in a worker"
print(len(train), train[0]["image"].shape, len(evaluation), len(memory), len(worker))
"""


@pytest.mark.slow  # the fixture, a Python process and a worker process
def test_streaming_a_tfds_source_and_a_memory_split_needs_no_tensorflow(tiny_tfds):
    """TensorFlow blocked (``test_no_tensorflow.BLOCK``) in a process that decodes an ArrayRecord
    TFDS split into arrays and streams one (train, with a map_fn, and eval) and an in-memory
    split; its Grain worker, spawned without the block, reports through the labels whether it
    imported TensorFlow."""
    # Imported here: a worker process imports this module to unpickle ArraySplit, and
    # test_no_tensorflow imports the trainer.
    from test_no_tensorflow import BLOCK

    directory = tiny_tfds["array_record"].data_path
    out = subprocess.run(
        [sys.executable, "-c", BLOCK + NO_TENSORFLOW, str(directory)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.split() == ["3", "(8,", "4,", "4,", "3)", "2", "2", "3"]
