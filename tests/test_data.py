"""Data: TFDS offline preparation from local copies, split roles, device-resident batching."""

import fcntl
import gzip
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEBIAN_FASHION_MNIST

from cnnjax.data import pipeline, tfds_source
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import ConfigError, DataUnavailableError, UnknownNameError


def test_split_roles():
    carve = pipeline.split_names({"train": 60000, "test": 10000}, 0.1)
    assert carve == {"train": "train[:54000]", "validation": "train[54000:]", "test": "test"}
    no_val = pipeline.split_names({"train": 60000, "test": 10000}, 0.0)
    assert no_val == {"train": "train", "validation": "test", "test": "test"}
    own = pipeline.split_names({"train": 9, "validation": 3, "test": 3}, 0.1)
    assert own == {"train": "train", "validation": "validation", "test": "test"}
    imagenet = pipeline.split_names({"train": 100, "validation": 10}, 0.0)
    assert imagenet["test"] == "validation"
    with pytest.raises(ConfigError):
        pipeline.split_names({"train": 10, "test": 1}, 1.0)


def test_offline_fashion_mnist_is_the_real_dataset(fmnist_data_dir):
    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    assert builder.is_prepared()
    test = tfds_source.load_arrays(builder, "test")
    assert test["image"].shape == (10000, 28, 28, 1) and test["image"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test["label"]), [1000] * 10)
    # The same examples as the raw IDX files (TFDS stores them in its own shuffled order).
    with gzip.open(f"{DEBIAN_FASHION_MNIST}/t10k-images-idx3-ubyte.gz") as f:
        raw_images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 28 * 28)
    with gzip.open(f"{DEBIAN_FASHION_MNIST}/t10k-labels-idx1-ubyte.gz") as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    ours = test["image"].reshape(10000, -1).astype(np.int64)
    for c in range(10):
        np.testing.assert_array_equal(
            np.sort(ours[test["label"] == c].sum(1)),
            np.sort(raw_images[raw_labels == c].astype(np.int64).sum(1)),
        )
    limited = tfds_source.load_arrays(builder, "train[54000:]", limit=100)
    assert limited["image"].shape[0] == 100
    # A limit larger than a carved slice stops at the slice's end.
    assert tfds_source.load_arrays(builder, "train[54000:]", limit=8000)["image"].shape[0] == 6000


def test_decoded_splits_are_cached_and_a_bad_cache_is_rebuilt(fmnist_data_dir):
    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    first = tfds_source.load_arrays(builder, "train", limit=300)
    path = tfds_source.array_cache_path(builder, "train[0:300]")
    assert path.is_file()
    cached = tfds_source.load_arrays(builder, "train", limit=300)
    for k in ("image", "label"):
        np.testing.assert_array_equal(cached[k], first[k])
        assert cached[k].dtype == first[k].dtype
    # A damaged file, or one that does not match the split, is read from TFDS and rewritten.
    damages = (
        lambda: path.write_bytes(b"not an npz"),
        lambda: np.savez(path, image=first["image"][:10], label=first["label"][:10]),
    )
    for damage in damages:
        damage()
        rebuilt = tfds_source.load_arrays(builder, "train", limit=300)
        np.testing.assert_array_equal(rebuilt["image"], first["image"])
        with np.load(path) as f:
            assert f["image"].shape == (300, 28, 28, 1)
    assert not list(path.parent.glob("*.tmp"))


def test_unwritable_cache_only_warns(fmnist_data_dir, monkeypatch):
    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)

    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(pipeline.np, "savez", refuse)
    with pytest.warns(UserWarning, match="not caching the decoded dataset"):
        arrays = tfds_source.load_arrays(builder, "train", limit=77)
    assert arrays["image"].shape == (77, 28, 28, 1)
    path = tfds_source.array_cache_path(builder, "train[0:77]")
    assert not path.exists() and not list(path.parent.glob("*.tmp"))


def test_a_cached_split_loads_without_tensorflow(fmnist_data_dir):
    """The cache is what spares a run the TensorFlow import (seconds) and the image decoding."""
    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    tfds_source.load_arrays(builder, "test")
    code = (
        "import sys\n"
        "from cnnjax.data import tfds, tfds_source\n"
        "b = tfds.builder('fashion_mnist', sys.argv[1])\n"
        "assert tfds_source.load_arrays(b, 'test')['image'].shape == (10000, 28, 28, 1)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, fmnist_data_dir], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_registered_checksums_are_the_debian_files():
    infos = tfds_lib.registered_url_infos("fashion_mnist")
    assert len(infos) == 4
    cls = tfds_lib._import_tfds().builder_cls("fashion_mnist")
    accepted = tfds_lib._local_url_infos(cls, tfds_lib.Path(DEBIAN_FASHION_MNIST))
    assert accepted == infos  # every Debian file is accepted through the registered table


def test_corrupt_local_copy_is_rejected(tmp_path):
    for f in tfds_lib.Path(DEBIAN_FASHION_MNIST).iterdir():
        shutil.copy(f, tmp_path / f.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    cls = tfds_lib._import_tfds().builder_cls("fashion_mnist")
    assert tfds_lib._local_url_infos(cls, tmp_path) is None


def test_missing_dataset_offline_gives_one_actionable_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(DataUnavailableError) as info:
        tfds_lib.builder("mnist", str(tmp_path), local_dir=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "'mnist'" in message and "nowhere" in message and "local_dir" in message
    assert "\n" not in message
    with pytest.raises(DataUnavailableError, match="downloads are off"):
        tfds_lib.builder("kmnist", str(tmp_path), download=False)


@pytest.mark.slow
def test_runs_waiting_to_prepare_find_the_dataset_prepared(fmnist_data_dir, tmp_path):
    """Two first runs at once on a fresh machine: while one prepares the dataset (here the test,
    holding the preparation lock) the others wait on the lock, then find it prepared instead of
    converting into the same directory (the second rename into place would fail)."""
    prepare = (
        "from cnnjax.data import tfds; "
        f"b = tfds.builder('fashion_mnist', {str(tmp_path)!r}); "
        "print(b.info.splits['train'].num_examples)"
    )
    directory = tmp_path / "fashion_mnist"
    directory.mkdir()
    with open(directory / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen([sys.executable, "-c", prepare], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        time.sleep(5)  # both past their imports and waiting on the lock
        assert [p.poll() for p in procs] == [None, None]
        assert [d.name for d in directory.iterdir()] == [".prepare.lock"]
        prepared = tfds_lib.Path(fmnist_data_dir) / "fashion_mnist"
        for version in prepared.iterdir():  # "prepared" by the lock holder
            if not version.name.startswith("."):
                shutil.copytree(version, directory / version.name)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [o.split()[-1] for o in outputs] == ["60000", "60000"]


def test_unknown_dataset_name():
    with pytest.raises(
        UnknownNameError, match="unknown TFDS dataset 'fashion_mnst'.*fashion_mnist"
    ):
        tfds_lib.builder("fashion_mnst", None)


def test_resident_batches_cover_every_example_once_per_epoch():
    split = {"image": jnp.arange(40).reshape(40, 1, 1, 1), "label": jnp.arange(40)}
    key = jax.random.key(0)
    order = pipeline.epoch_permutation(key, 3, 40)
    seen = np.concatenate([pipeline.take_batch(split, order, i, 8)["label"] for i in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    again = pipeline.epoch_permutation(key, 3, 40)
    np.testing.assert_array_equal(order, again)  # the same epoch replays the same order
    assert not np.array_equal(order, pipeline.epoch_permutation(key, 4, 40))


def test_eval_padding_masks_the_filler():
    arrays = {"image": np.ones((5, 2, 2, 1), np.uint8), "label": np.arange(5, dtype=np.int32)}
    padded = pipeline.resident_eval_split(arrays, 4)
    assert padded["label"].shape == (8,)
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 1, 1, 0, 0, 0])
    sliced = pipeline.slice_batch(jax.tree.map(jnp.asarray, padded), 1, 4)
    np.testing.assert_array_equal(sliced["label"], [4, 0, 0, 0])


def test_channel_stats_are_per_channel():
    images = np.zeros((10, 2, 2, 3), np.uint8)
    images[..., 1] = 255
    mean, std = pipeline.channel_stats(images)
    np.testing.assert_allclose(mean, [0, 1, 0])
    assert min(std) > 0  # floored: a constant channel must not divide by zero
