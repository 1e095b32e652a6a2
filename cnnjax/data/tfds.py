"""TFDS datasets by name, with an offline path through local copies of the original files.

TFDS prepares a dataset once (download, checksum, convert to its own format) and reads it from
``data_dir`` afterwards. Without internet the download fails, so before downloading we look for
the original files locally (a directory the user names, or a known system location such as
Debian's ``dataset-fashion-mnist`` package) and hand them to TFDS as its ``manual_dir``. TFDS
verifies every file against a checksum table; local copies may be re-compressed (Debian's gzip
headers differ from upstream although the decompressed bytes are identical), so the project ships
the checksums of those known copies in ``checksums/<dataset>.tsv`` and a file is accepted when it
matches either TFDS's own checksum or one registered there.
"""

import contextlib
import fcntl
import hashlib
import os
import socket
import sys
import urllib.parse
from pathlib import Path

from cnnjax.errors import DataUnavailableError, unknown_name

CHECKSUMS_DIR = Path(__file__).parent / "checksums"

# Where operating-system packages put the original files of a dataset.
SYSTEM_COPIES = {
    "fashion_mnist": ["/usr/share/datasets/fashion-mnist"],
}


def builder(name: str, data_dir: str | None, local_dir: str | None = None, download=True):
    """Returns the prepared TFDS builder of ``name``, preparing it first if needed.

    Args:
      name: a TFDS dataset name (``mnist``, ``fashion_mnist``, ``cifar10``...).
      data_dir: TFDS data directory (None: TFDS's default, ``~/tensorflow_datasets``).
      local_dir: a directory with the dataset's original files, used when TFDS has not prepared
        the dataset yet (tried before any download).
      download: whether downloading is allowed as the last resort.

    Raises:
      UnknownNameError: ``name`` is not a TFDS dataset.
      DataUnavailableError: not prepared, no local copy, and no way to download.
    """
    tfds = _import_tfds()
    try:
        cls = tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        raise unknown_name("TFDS dataset", name, _IMAGE_DATASETS_HINT) from None
    ds_builder = cls(data_dir=data_dir)
    if ds_builder.is_prepared():
        return ds_builder
    with _preparing(Path(ds_builder.data_dir).parent):
        ds_builder = cls(data_dir=data_dir)  # another process may have prepared it meanwhile
        if ds_builder.is_prepared():
            return ds_builder
        return _prepare(cls, name, ds_builder, data_dir, local_dir, download)


@contextlib.contextmanager
def _preparing(directory: Path):
    """An exclusive lock on preparing the dataset whose versions live in ``directory``: two runs
    started at once on a fresh machine would otherwise both convert into the same directory,
    and the second to finish would fail renaming its copy into place. The kernel drops the lock
    of a killed process."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prepare(cls, name: str, ds_builder, data_dir, local_dir, download):
    """Prepares ``name`` from a local copy of its files, else by downloading."""
    candidates = [local_dir] if local_dir else []
    candidates += SYSTEM_COPIES.get(name, [])
    for directory in candidates:
        url_infos = _local_url_infos(cls, Path(directory))
        if url_infos:
            return _prepare_from_local(cls, data_dir, Path(directory), url_infos)
    _check_reachable(cls, name, ds_builder.data_dir, candidates, download)
    import_tensorflow()
    ds_builder.download_and_prepare()
    return ds_builder


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


def import_tensorflow():
    """TensorFlow, kept off accelerators (it only reads files); call before any tf.data use."""
    with _native_stderr_silenced():
        import tensorflow as tf

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


def _prepare_from_local(cls, data_dir, directory: Path, url_infos: dict):
    tfds = _import_tfds()
    import_tensorflow()

    # Same name, so the prepared data lands where `tfds.builder(name)` reads it; only the
    # accepted checksums differ.
    class LocalCopy(cls, skip_registration=True):
        name = cls.name

    LocalCopy.url_infos = url_infos
    local = LocalCopy(data_dir=data_dir)
    config = tfds.download.DownloadConfig(manual_dir=str(directory), try_download_gcs=False)
    local.download_and_prepare(download_config=config)
    return cls(data_dir=data_dir)


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
