"""Preparing TFDS datasets: ArrayRecord files (a TFRecord dataset converted once, to the same
decoded examples), one progress line of cnnjax's own instead of TFDS's bars and logging, and
TensorFlow needed only to prepare or convert."""

import contextlib
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_no_tensorflow import BLOCK

from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import DataUnavailableError

ROOT = Path(__file__).resolve().parents[1]
TINY = "cnnjax_tiny_images"
TINY_SPLITS = {"train": 12, "test": 4}


class CnnjaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """16 random 5x3 grey images: a registered TFDS dataset that prepares in a second."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(5, 3, 1)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self, features=features, supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name, n) for name, n in TINY_SPLITS.items()}

    def _generate_examples(self, split, n):
        rng = np.random.default_rng(len(split))
        for i in range(n):
            image = rng.integers(0, 256, (5, 3, 1), dtype=np.uint8)
            yield f"{split}{i}", {"image": image, "label": i % 3}


def prepare_tfrecord(data_dir: Path) -> Path:
    """The tiny dataset prepared by TFDS itself in its default format, TFRecord, as a user's
    ``~/tensorflow_datasets`` holds it; returns its version directory."""
    CnnjaxTinyImages(data_dir=str(data_dir)).download_and_prepare()
    return data_dir / TINY / "1.0.0"


def decoded_by_tensorflow(data_dir: Path) -> dict:
    """Every split decoded by TFDS's tf.data reader from the main format on disk."""
    original = CnnjaxTinyImages(data_dir=str(data_dir))
    return {s: tfds.as_numpy(original.as_dataset(split=s, batch_size=-1)) for s in TINY_SPLITS}


def decoded_by_data_source(ds_builder) -> dict:
    """Every split decoded through ``as_data_source`` (random access, no TensorFlow), in order."""
    out = {}
    for split in TINY_SPLITS:
        source = ds_builder.as_data_source(split)
        examples = [source[i] for i in range(len(source))]
        out[split] = {k: np.stack([e[k] for e in examples]) for k in ("image", "label")}
    return out


def digests(directory: Path, pattern: str) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob(pattern)}


def test_a_tfrecord_dataset_is_converted_once_under_the_lock_to_identical_examples(
    tmp_path, monkeypatch
):
    version_dir = prepare_tfrecord(tmp_path)
    tfrecords = digests(version_dir, "*.tfrecord-*")
    reference = decoded_by_tensorflow(tmp_path)
    taken, held = [], []
    preparing, convert = tfds_lib._preparing, tfds_lib._convert_to_array_record

    @contextlib.contextmanager
    def recording_lock(directory):
        with preparing(directory):
            taken.append(directory)
            held.append(directory)
            yield
            held.remove(directory)

    def converting(name, directory):
        assert held == [tmp_path / TINY], "converted outside the preparation lock"
        convert(name, directory)

    monkeypatch.setattr(tfds_lib, "_preparing", recording_lock)
    monkeypatch.setattr(tfds_lib, "_convert_to_array_record", converting)
    ours = tfds_lib.builder(TINY, str(tmp_path))
    assert ours.info.file_format.value == "array_record"
    decoded = decoded_by_data_source(ours)
    for split in TINY_SPLITS:  # the same examples, in the same order, bit for bit
        for key in ("image", "label"):
            assert decoded[split][key].dtype == reference[split][key].dtype
            np.testing.assert_array_equal(decoded[split][key], reference[split][key])
    # The TFRecord files stay, untouched and still read by tfds.load (their main format).
    assert digests(version_dir, "*.tfrecord-*") == tfrecords
    again = decoded_by_tensorflow(tmp_path)
    np.testing.assert_array_equal(again["train"]["image"], reference["train"]["image"])
    # Once: a second call finds the ArrayRecord files without taking the lock.
    array_records = digests(version_dir, "*.array_record-*")
    assert len(array_records) == len(tfrecords) == 2
    assert tfds_lib.builder(TINY, str(tmp_path)).info.file_format.value == "array_record"
    assert taken == [tmp_path / TINY]
    assert digests(version_dir, "*.array_record-*") == array_records


def test_a_killed_conversion_leaves_the_metadata_and_is_redone(tmp_path, monkeypatch):
    version_dir = prepare_tfrecord(tmp_path)
    reference = decoded_by_tensorflow(tmp_path)
    # What a SIGKILL leaves: a shard under TFDS's temporary name.
    (version_dir / f"incomplete.{'0' * 32}.{TINY}-train.array_record-00000-of-00001").touch()
    convert_shard = tfds_lib._convert_shard
    shards = []

    def dies_at_the_second_shard(*args):
        shards.append(args[2])
        if len(shards) == 2:
            raise KeyboardInterrupt
        convert_shard(*args)

    monkeypatch.setattr(tfds_lib, "_convert_shard", dies_at_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        tfds_lib.builder(TINY, str(tmp_path))
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "tfrecord" and "alternativeFileFormats" not in info
    assert [p.name for p in version_dir.glob("*incomplete*")] == []
    monkeypatch.setattr(tfds_lib, "_convert_shard", convert_shard)
    decoded = decoded_by_data_source(tfds_lib.builder(TINY, str(tmp_path)))
    np.testing.assert_array_equal(decoded["test"]["image"], reference["test"]["image"])
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "tfrecord" and info["alternativeFileFormats"] == ["array_record"]


def accept_any_local_copy(monkeypatch, directory: Path) -> None:
    """The tiny dataset as if ``directory`` held its original files with good checksums (it
    downloads nothing, so any url infos do)."""
    directory.mkdir()
    monkeypatch.setitem(tfds_lib.SYSTEM_COPIES, TINY, [str(directory)])
    monkeypatch.setattr(tfds_lib, "_local_url_infos", lambda cls, d: {"https://tiny.invalid": None})


@pytest.mark.parametrize("source", ["download", "local copy"])
def test_preparing_writes_a_start_and_an_end_line_and_nothing_else(
    source, tmp_path, monkeypatch, capfd, caplog
):
    """No tqdm bars, no TFDS stdout lines, no absl records (pytest's log capture would keep
    them off stderr, so they are looked for there), and absl's level and TFDS's bars restored."""
    from tensorflow_datasets.core.utils import tqdm_utils

    what = f"downloading and preparing {TINY}"
    if source == "local copy":
        accept_any_local_copy(monkeypatch, tmp_path / "originals")
        what = f"preparing {TINY} from {tmp_path / 'originals'}"
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="absl"):
        ds_builder = tfds_lib.builder(TINY, str(tmp_path / "data"))
        assert logging.getLogger("absl").level == logging.INFO
    out, err = capfd.readouterr()
    assert out == ""
    end = rf"{re.escape(what)}: 16 examples, \d+ s, done"
    assert re.fullmatch(rf"{re.escape(what)} \.\.\.\n{end}\n", err), err
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []
    assert tqdm_utils._active
    assert ds_builder.info.file_format.value == "array_record"
    assert ds_builder.info.splits["train"].num_examples == 12


class Terminal:
    """A stream that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_on_a_terminal_the_line_is_rewritten_in_place_every_interval():
    now = [0.0]
    stream = Terminal()
    line = tfds_lib._ProgressLine("converting x", 70_000, stream, lambda: now[0], interval_s=0.5)
    line.start()
    for _ in range(3):
        line.advance(1000)  # within the interval: not shown
    now[0] = 12.4
    line.advance(39_000)
    line.advance(28_000)
    now[0] = 20.6
    line.end()
    assert stream.text == (
        "\rconverting x: 0/70,000 examples, 0 s"
        "\rconverting x: 42,000/70,000 examples, 12 s"
        "\rconverting x: 70,000/70,000 examples, 21 s, done\n"
    )
    # A shorter text blanks what is left of the longer one; one too wide for the terminal (80
    # columns where the stream cannot be asked) keeps its end, where the numbers are.
    stream = Terminal()
    line = tfds_lib._ProgressLine("p" * 100, None, stream, lambda: 0.0)
    line._rewrite("abcdef")
    line._rewrite("xy")
    line._rewrite("z" * 70 + "0123456789" + "9 s")
    assert stream.text.split("\r")[1:] == ["abcdef", "xy    ", "..." + "z" * 63 + "01234567899 s"]
    assert len(stream.text.split("\r")[-1]) == 79
    line.end(failed=True)
    assert stream.text.endswith("\n")  # the error then starts on its own line


def test_missing_tensorflow_is_one_line_naming_what_needs_it_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(DataUnavailableError) as info:
        tfds_lib.import_tensorflow("preparing fashion_mnist")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("preparing fashion_mnist needs TensorFlow, which is not installed")
    for fix in ("pip install 'cnnjax[prepare]'", "pip install tensorflow-cpu", "ArrayRecord"):
        assert fix in message


# With TensorFlow hidden (BLOCK): a prepared ArrayRecord dataset is read, TFDS and all, and a
# dataset to prepare or to convert is one line.
WITHOUT_TENSORFLOW = (
    BLOCK
    + """
from cnnjax.data import tfds
from cnnjax.errors import DataUnavailableError

prepared, empty, tfrecord = sys.argv[1:]
b = tfds.builder("fashion_mnist", prepared)
example = b.as_data_source("test")[0]
print("read", b.info.file_format.value, example["image"].shape, "tensorflow" in sys.modules)
for data_dir in (empty, tfrecord):
    try:
        tfds.builder("fashion_mnist", data_dir)
    except DataUnavailableError as e:
        print("error:", e)
"""
)


def test_without_tensorflow_array_records_read_and_what_needs_it_is_one_line(
    fmnist_data_dir, tmp_path
):
    # A Fashion-MNIST prepared in TFRecord, as far as its metadata says (conversion stops at
    # the import, before any shard is read).
    version = next(p for p in (Path(fmnist_data_dir) / "fashion_mnist").iterdir() if p.is_dir())
    tfrecord = tmp_path / "tfrecord" / "fashion_mnist" / version.name
    tfrecord.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json", "label.labels.txt"):
        shutil.copy(version / name, tfrecord / name)
    info = json.loads((tfrecord / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (tfrecord / "dataset_info.json").write_text(json.dumps(info))
    args = [fmnist_data_dir, str(tmp_path / "empty"), str(tmp_path / "tfrecord")]
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "read array_record (28, 28, 1) False"
    assert lines[1].startswith("error: preparing fashion_mnist needs TensorFlow")
    assert lines[2].startswith("error: converting fashion_mnist to ArrayRecord needs TensorFlow")
    assert all("cnnjax[prepare]" in line for line in lines[1:]) and len(lines) == 3
