"""TFDS datasets by name, with an offline path through local copies of the original files.

TFDS prepares a dataset once (download, checksum, convert to its own format) and reads it from
``data_dir`` afterwards. Without internet the download fails, so before downloading we look for
the original files locally (a directory the user names, or a known system location such as
Debian's ``dataset-fashion-mnist`` package) and hand them to TFDS as its ``manual_dir``. TFDS
verifies every file against a checksum table; local copies may be re-compressed (Debian's gzip
headers differ from upstream although the decompressed bytes are identical), so the project ships
the checksums of those known copies in ``checksums/<dataset>.tsv`` and a file is accepted when it
matches either TFDS's own checksum or one registered there.

Datasets are kept in ArrayRecord format, which TFDS reads by random access
(``builder.as_data_source``) without TensorFlow; TensorFlow is needed only to prepare one, or to
convert one prepared earlier in TFRecord format (done once, next to the TFRecord files, which
stay for other programs). While preparing or converting, TFDS's progress bars and absl logging
are held back and cnnjax writes one line of its own on stderr.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

from cnnjax.errors import DataUnavailableError, unknown_name

CHECKSUMS_DIR = Path(__file__).parent / "checksums"

# Where operating-system packages put the original files of a dataset.
SYSTEM_COPIES = {
    "fashion_mnist": ["/usr/share/datasets/fashion-mnist"],
}


# The format cnnjax prepares datasets in and reads them from (``FileFormat.ARRAY_RECORD.value``).
ARRAY_RECORD = "array_record"


def builder(name: str, data_dir: str | None, local_dir: str | None = None, download=True):
    """Returns the TFDS builder of ``name`` reading ArrayRecord files, preparing them if needed.

    A dataset prepared earlier in another format (TFRecord, by TFDS's defaults) is converted
    once; one not prepared at all is prepared from a local copy of its files, else downloaded.
    Either writes one progress line on stderr and needs TensorFlow.

    Args:
      name: a TFDS dataset name (``mnist``, ``fashion_mnist``, ``cifar10``...).
      data_dir: TFDS data directory (None: TFDS's default, ``~/tensorflow_datasets``).
      local_dir: a directory with the dataset's original files, used when TFDS has not prepared
        the dataset yet (tried before any download).
      download: whether downloading is allowed as the last resort.

    Returns:
      The builder, with ``info.file_format`` ArrayRecord (``as_data_source`` reads it).

    Raises:
      UnknownNameError: ``name`` is not a TFDS dataset.
      DataUnavailableError: not prepared, no local copy, and no way to download; or TensorFlow
        is missing and the dataset must be prepared or converted.
    """
    tfds = _import_tfds()
    try:
        cls = tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        raise unknown_name("TFDS dataset", name, _IMAGE_DATASETS_HINT) from None
    with _tfds_quiet():  # an unprepared builder logs warnings as soon as it is constructed
        ds_builder = cls(data_dir=data_dir)
        if not _has_array_records(ds_builder):
            with _preparing(Path(ds_builder.data_dir).parent):
                ds_builder = _prepared(cls, name, data_dir, local_dir, download)
    return _reading_array_records(ds_builder)


def _prepared(cls, name: str, data_dir, local_dir, download):
    """Under the preparation lock: the builder of ``name`` once it has ArrayRecord files."""
    ds_builder = cls(data_dir=data_dir)  # another process may have prepared it meanwhile
    if _has_array_records(ds_builder):
        return ds_builder
    if ds_builder.is_prepared():
        _convert_to_array_record(name, Path(ds_builder.data_dir))
    else:
        _prepare(cls, name, ds_builder, data_dir, local_dir, download)
    return cls(data_dir=data_dir)


def _has_array_records(ds_builder) -> bool:
    """Whether the dataset is prepared with ArrayRecord files, as its main format or as an
    alternative one (what converting a TFRecord dataset in place records)."""
    from tensorflow_datasets.core import dataset_info

    # From the proto: TFDS restores ``alternative_file_formats`` there but not into
    # ``info.alternative_file_formats`` (always empty on a builder read from its directory).
    formats = dataset_info.available_file_formats(ds_builder.info.as_proto)
    return ds_builder.is_prepared() and ARRAY_RECORD in formats


def _reading_array_records(ds_builder):
    """``ds_builder`` switched to its ArrayRecord files where they are an alternative format
    (what ``as_data_source`` would do itself, were the alternative formats restored)."""
    if ds_builder.info.file_format.value != ARRAY_RECORD:
        ds_builder.info.set_file_format(ARRAY_RECORD, override=True, override_if_initialized=True)
    return ds_builder


@contextlib.contextmanager
def _preparing(directory: Path):
    """An exclusive lock on preparing (or converting) the dataset whose versions live in
    ``directory``: two runs started at once on a fresh machine would otherwise both write into
    the same directory, and the second to finish would fail renaming its copy into place. The
    kernel drops the lock of a killed process."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prepare(cls, name: str, ds_builder, data_dir, local_dir, download):
    """Prepares ``name`` in ArrayRecord format from a local copy of its files, else by
    downloading."""
    candidates = [local_dir] if local_dir else []
    candidates += SYSTEM_COPIES.get(name, [])
    for directory in candidates:
        url_infos = _local_url_infos(cls, Path(directory))
        if url_infos:
            return _prepare_from_local(cls, name, data_dir, Path(directory), url_infos)
    _check_reachable(cls, name, ds_builder.data_dir, candidates, download)
    import_tensorflow(f"preparing {name}")
    with _progress_line(f"downloading and preparing {name}") as progress:
        _counting(cls, progress)(data_dir=data_dir, file_format=ARRAY_RECORD).download_and_prepare()


# Shown when a dataset name is unknown (TFDS has ~1,000 datasets; these are the common ones).
_IMAGE_DATASETS_HINT = [
    "mnist",
    "fashion_mnist",
    "kmnist",
    "emnist",
    "cifar10",
    "cifar100",
    "svhn_cropped",
    "stl10",
    "imagenette",
    "imagenet2012",
    "... (tfds.list_builders())",
]


def _import_tfds():
    # Builders and their metadata need no TensorFlow; it is imported (4-7 s) only to prepare or
    # read a dataset, through import_tensorflow().
    import tensorflow_datasets as tfds

    return tfds


def import_tensorflow(purpose: str = "reading a TFDS dataset through tf.data"):
    """TensorFlow, kept off accelerators (it only reads files); call before any tf.data use.

    Args:
      purpose: what needs it, for the error when it is missing ("preparing mnist").

    Raises:
      DataUnavailableError: TensorFlow is not installed (an optional dependency, the
        ``prepare`` extra).
    """
    try:
        with _native_stderr_silenced():
            import tensorflow as tf
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise  # TensorFlow is there but broken: a traceback says more than we can
        raise DataUnavailableError(
            f"{purpose} needs TensorFlow, which is not installed. Fix: pip install "
            "'cnnjax[prepare]' (or pip install tensorflow-cpu); a dataset already prepared in "
            "ArrayRecord format needs no TensorFlow"
        ) from None
    tf.config.set_visible_devices([], "GPU")
    return tf


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null for the duration: TensorFlow's C++ start-up banners
    ("oneDNN custom operations are on", CPU feature notes) are written before absl logging is
    initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hold them back. Python-level errors raised
    inside still propagate (and print once stderr is back)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def registered_url_infos(name: str) -> dict:
    """Checksums of known local copies of ``name``'s files (``checksums/<name>.tsv``)."""
    from tensorflow_datasets.core.download import checksums

    path = CHECKSUMS_DIR / f"{name}.tsv"
    return checksums.load_url_infos(path) if path.exists() else {}


def _local_url_infos(cls, directory: Path) -> dict | None:
    """The url infos under which every file of ``cls`` in ``directory`` is accepted, or None.

    For each url the local file (named as TFDS names it) must match TFDS's own checksum or the
    one this project registered for a known re-packaged copy.
    """
    official = cls.url_infos or {}
    registered = registered_url_infos(cls.name)
    accepted = {}
    for url, info in official.items():
        path = directory / (info.filename or Path(urllib.parse.urlparse(url).path).name)
        if not path.is_file():
            return None
        sha = _sha256(path)
        match = [i for i in (info, registered.get(url)) if i is not None and i.checksum == sha]
        if not match:
            return None
        accepted[url] = match[0]
    return accepted or None


def _prepare_from_local(cls, name: str, data_dir, directory: Path, url_infos: dict):
    tfds = _import_tfds()
    import_tensorflow(f"preparing {name}")
    config = tfds.download.DownloadConfig(manual_dir=str(directory), try_download_gcs=False)
    with _progress_line(f"preparing {name} from {directory}") as progress:
        local = _counting(cls, progress, url_infos)(data_dir=data_dir, file_format=ARRAY_RECORD)
        local.download_and_prepare(download_config=config)


def _counting(cls, progress: "_ProgressLine", url_infos: dict | None = None):
    """A subclass of ``cls`` that counts on ``progress`` the examples it generates and prints
    nothing of its own (TFDS prints two lines on stdout around a preparation).

    Same name, so the data lands where ``cls`` reads it; ``url_infos``, if given, replace the
    checksums TFDS accepts (those of a local copy).
    """

    class Preparing(cls, skip_registration=True):
        name = cls.name

        def _generate_examples(self, *args, **kwargs):
            examples = super()._generate_examples(*args, **kwargs)
            # Beam-based builders return a PTransform, which is left alone (and uncounted).
            return progress.counted(examples) if isinstance(examples, Iterable) else examples

        def _log_download_bytes(self):
            pass

        def _log_download_done(self):
            pass

    if url_infos is not None:
        Preparing.url_infos = url_infos
    return Preparing


def _convert_to_array_record(name: str, directory: Path) -> None:
    """Writes an ArrayRecord copy of each shard of the dataset version in ``directory``
    (prepared in another format, e.g. TFRecord) next to it, record for record in the same
    order, then lists ArrayRecord among the version's formats. The original shards and main
    format stay, so other programs reading them with ``tfds.load`` are not affected.

    Idempotent: a conversion killed midway leaves the metadata untouched and is redone whole.
    """
    from tensorflow_datasets.core import dataset_info
    from tensorflow_datasets.core.utils import py_utils

    import_tensorflow(f"converting {name} to ArrayRecord")  # the shards are read by tf.data
    info = dataset_info.read_proto_from_builder_dir(directory)
    _remove_incomplete_files(directory)
    total = sum(sum(split.shard_lengths) for split in info.splits)
    with _progress_line(f"converting {name} in {directory} to ArrayRecord", total) as progress:
        for source, target in _shard_pairs(info, directory):
            _convert_shard(info.file_format, source, target, progress)
    info.alternative_file_formats.append(ARRAY_RECORD)
    with py_utils.atomic_write(dataset_info.dataset_info_path(directory), "w") as f:
        f.write(dataset_info.get_dataset_info_json(info))


def _shard_pairs(info, directory: Path) -> list[tuple[Path, Path]]:
    """(source, ArrayRecord target) paths of every shard of every split of ``info``."""
    from tensorflow_datasets.core import dataset_info

    source = dataset_info.get_split_dict_from_proto(info, directory, info.file_format)
    target = dataset_info.get_split_dict_from_proto(info, directory, ARRAY_RECORD)
    pairs = []
    for split_name, split in source.items():
        n = split.num_shards
        for i in range(n):
            pairs.append((_shard_path(split, i, n), _shard_path(target[split_name], i, n)))
    return pairs


def _shard_path(split, index: int, num_shards: int) -> Path:
    return Path(split.filename_template.sharded_filepath(shard_index=index, num_shards=num_shards))


_CONVERT_BATCH = 1024  # serialized records read at once while converting


def _convert_shard(source_format: str, source: Path, target: Path, progress) -> None:
    """Copies the serialized examples of ``source`` into the ArrayRecord file ``target``
    (written under a temporary name, renamed when complete)."""
    from tensorflow_datasets.core import file_adapters
    from tensorflow_datasets.core.utils import py_utils

    reader = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat(source_format)]
    writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    # In batches: tf.data's per-element cost in eager mode made Fashion-MNIST's 60,000 training
    # records take 21 s one by one, against 0.2 s in batches of 1,024.
    batches = reader.make_tf_data(source).batch(_CONVERT_BATCH).as_numpy_iterator()
    records = progress.counted(record for batch in batches for record in batch)
    with py_utils.incomplete_file(target) as tmp:
        writer.write_examples(tmp, enumerate(records))


def _remove_incomplete_files(directory: Path) -> None:
    """Deletes what a killed conversion left under temporary names (TFDS's naming)."""
    from tensorflow_datasets.core.utils import py_utils

    for path in directory.iterdir():
        if py_utils.is_incomplete_file(path):
            path.unlink()


class _ProgressLine:
    """cnnjax's one line about a long preparation: ``WHAT: N[/TOTAL] examples, S s``.

    On a terminal the line is rewritten in place (``\\r``), at most every ``interval_s``, and
    cut to the terminal's width (a wrapped line cannot be rewritten); elsewhere (a log file, CI)
    it is a start line and an end line only, so that a log holds no carriage-return debris.
    """

    def __init__(self, what: str, total: int | None, stream, clock=time.monotonic, interval_s=0.5):
        self.what, self.total, self.stream, self.clock = what, total, stream, clock
        self.interval_s = interval_s
        self.tty = stream.isatty()
        self.count = 0
        self.started = clock()
        self.shown_at = -float("inf")
        self.width = 0  # of the text on the terminal, which a shorter text must blank out

    def text(self) -> str:
        total = f"/{self.total:,}" if self.total else ""
        return f"{self.what}: {self.count:,}{total} examples, {self.clock() - self.started:,.0f} s"

    def start(self) -> None:
        if self.tty:
            self._rewrite(self.text())
        else:
            self._write(f"{self.what} ...\n")

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self.tty and self.clock() - self.shown_at >= self.interval_s:
            self._rewrite(self.text())

    def counted(self, items: Iterable) -> Iterator:
        """``items``, advancing by one for each."""
        for item in items:
            self.advance()
            yield item

    def end(self, failed: bool = False) -> None:
        """The end line (``, done``), or on a failure only a newline on a terminal, so that the
        error starts on a line of its own."""
        if failed:
            if self.tty:
                self._write("\n")
        elif self.tty:
            self._rewrite(f"{self.text()}, done")
            self._write("\n")
        else:
            self._write(f"{self.text()}, done\n")

    def _rewrite(self, text: str) -> None:
        columns = _terminal_columns(self.stream)
        if len(text) >= columns:  # the numbers at the end are what changes: keep them
            text = "..." + text[len(text) - columns + 4 :]
        self._write("\r" + text.ljust(self.width))
        self.width = len(text)
        self.shown_at = self.clock()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _terminal_columns(stream) -> int:
    """Width of the terminal ``stream`` writes to (80 where it cannot be asked)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 80


@contextlib.contextmanager
def _progress_line(what: str, total: int | None = None):
    """A ``_ProgressLine`` on stderr, started and ended around the block."""
    progress = _ProgressLine(what, total, sys.stderr)
    progress.start()
    try:
        yield progress
    except BaseException:
        progress.end(failed=True)
        raise
    progress.end()


@contextlib.contextmanager
def _tfds_quiet():
    """TFDS's progress bars (a dozen nested tqdm bars per preparation) and absl's INFO and
    WARNING lines (TFDS's and TensorFlow's) held back for the duration, then restored as they
    were: cnnjax's own progress line says what is going on. Errors still pass."""
    from tensorflow_datasets.core.utils import tqdm_utils

    bars = tqdm_utils._active  # TFDS has setters for its switch but no getter
    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow")]
    levels = [logger.level for logger in loggers]
    tqdm_utils.disable_progress_bar()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(bars)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_reachable(cls, name: str, target, tried: list[str], download: bool) -> None:
    """Fails fast (instead of TFDS's minutes of retries) when downloading is off or the download
    hosts don't resolve."""
    reason = None if download else "downloads are off (data.download=False)"
    hosts = {urllib.parse.urlparse(url).hostname for url in (cls.url_infos or {})}
    for host in sorted(h for h in hosts if h and not reason):
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            reason = f"{host} is unreachable"
    if reason:
        tried_text = ", ".join(tried) if tried else "none known for this dataset"
        hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
        raise DataUnavailableError(
            f"dataset {name!r} is not prepared in {target} and cannot be downloaded ({reason}); "
            f"local copies tried: {tried_text}. Fix: pass --config.data.local_dir=DIR with the "
            f"original files{hint}, or prepare it once on a machine with internet"
        )
