"""A folder of the user's images as a dataset (``--config.dataset=folder:PATH``).

Layout, as Keras ``image_dataset_from_directory`` and torchvision ``ImageFolder`` read it:
``PATH/<class>/...`` or ``PATH/train/<class>/...`` with optional ``PATH/validation/<class>/...``
(or ``val``) and ``PATH/test/<class>/...``; the split folders must hold the same classes. Class
names are the sorted class folder names, labels their indices. A class folder's subfolders
belong to it. A split without a folder is carved from train (``carve``).

What counts as an image:

* Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) and what operating systems
  leave behind (``Thumbs.db``, ``desktop.ini``, ``__MACOSX``) are ignored, and so are files
  directly in ``PATH`` or a split folder (a README or licence next to the class folders).
* Every other file in a class folder must be an image: a name ending in ``IMAGE_EXTENSIONS``
  (any case) and content PIL identifies as one of ``IMAGE_FORMATS`` (checked from the header
  when the folder is opened, without decoding). Anything else is refused, naming the file,
  rather than silently dropped: a folder of ``.tif`` scans would otherwise train on nothing.
  GIF and WebP animations give their first frame.

Decoding (``decode``, the same for every image): EXIF orientation applied; 16-bit grey scaled
to 8 bits (divided by 257, as ``prediction.load_image`` does; PIL's own conversion would clip);
alpha dropped (PIL's conversion to RGB, as Keras and torchvision do, not composited); palette,
CMYK and the rest converted by PIL to grey or RGB; then resized to the source's (H, W) with
PIL's bilinear filter, which averages over the whole footprint when shrinking (antialiased, as
torchvision's ``Resize`` on PIL images). Large JPEGs are decoded at a reduced scale by libjpeg
first (``draft``), never below the target size. The channel count is the majority's: grey modes
(``GREY_MODES``) count as 1, everything else (palette, RGB, CMYK...) as 3, a tie as 3.

Splits without a folder are carved from train, class by class (each takes its fraction of
every class, rounded by largest remainders; every class keeps at least one training image), in
an order that is a hash of the seed and each file's relative path: the same files land in the
same split on every machine, whatever order the files were made or listed in.

``arrays`` keeps each decoded split in one uncompressed ``.npz`` under ``cache_dir``, named by a
hash of its files (relative path, size, mtime), labels, image shape and decoder version; it is
written atomically, a damaged or foreign file there is decoded again and replaced, and a folder
that cannot be written only skips the cache (a warning). Uncompressed, because decoded photos
shrink little (64x64 crops: 98 -> 80 MB) while zlib makes the read 7x and the write 10x slower.

Errors (``ConfigError``, one line naming the path) are raised while opening the folder, before
anything is written: missing path, a file instead of a folder, no class folders, one class, a
class folder without images, a non-image file, split folders that disagree, images of different
sizes without ``image_size``. A file whose header is fine but whose pixels do not decode raises
the same kind of line when it is decoded.
"""

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnnjax.data import source
from cnnjax.errors import ConfigError, unknown_name

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "WEBP")  # PIL's names, identified by content
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})  # compared lowercased
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
# Modes PIL gives greyscale files (1-bit, 8-bit, with alpha, 16/32-bit integer, float).
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
RESAMPLE = "bilinear"
# Part of every cache key: bump when decoding changes, so old caches are not read.
DECODER_VERSION = 1
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 turn the image by 90 degrees


class Header(NamedTuple):
    """What opening a file tells without decoding it."""

    mode: str  # PIL's mode (``L``, ``RGB``, ``P``, ``I;16``...)
    size: tuple[int, int]  # (W, H) as displayed, after the EXIF orientation
    nbytes: int
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split: random access, each example decoded from its file on demand.

    Holds paths and labels only (what the streamed feed's worker processes receive, pickled).

    Attributes:
      root: the dataset folder, absolute.
      files: paths relative to ``root``, POSIX separators, in label then path order.
      labels: one label per file.
      image_shape: (H, W, C) of every decoded example.
      fingerprint: hash of the files (path, size, mtime), labels, shape and decoder: the key of
        the split's cache file.
    """

    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    image_shape: tuple[int, int, int]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        """Example ``index``: ``image`` uint8 (H, W, C), ``label`` int."""
        path = os.path.join(self.root, self.files[index])
        return {"image": decode(path, self.image_shape), "label": self.labels[index]}

    def sliced(self, start: int | None, stop: int | None) -> "FolderSplit":
        """Examples ``start .. stop - 1`` as a split of their own (with its own cache key)."""
        cut = slice(start, stop)
        key = hashlib.sha256(f"{self.fingerprint}[{start}:{stop}]".encode()).hexdigest()
        return dataclasses.replace(
            self, files=self.files[cut], labels=self.labels[cut], fingerprint=key
        )


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """A folder of images as a ``cnnjax.data.source.Source``; made by ``open_folder``.

    Attributes:
      name: ``folder:<absolute path>``.
      image_shape: (H, W, C) of every decoded example.
      class_names: sorted class folder names; label ``i`` is ``class_names[i]``.
      splits: split name (``train``, maybe ``validation``, ``test``) -> its examples.
      cache_dir: where ``arrays`` keeps decoded splits.
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    splits: dict[str, FolderSplit]
    cache_dir: str

    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

    def split(self, name: str) -> FolderSplit:
        """Split ``name``, or a slice of it written as TFDS writes one (``train[0:512]``)."""
        base, start, stop = source.parse_split(name)
        if base not in self.splits:
            raise unknown_name(f"split of {self.name}", base, self.splits)
        split = self.splits[base]
        return split if start is None and stop is None else split.sliced(start, stop)

    def arrays(self, name: str) -> dict:
        """Split ``name`` decoded: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,).

        Read from ``cache_dir/<fingerprint>.npz`` when a valid one is there, else decoded (in
        threads: PIL releases the GIL while decoding and resizing) and written there.
        """
        split = self.split(name)
        path = Path(self.cache_dir, f"{split.fingerprint}.npz")
        arrays = read_cache(path, split)
        if arrays is None:
            arrays = decode_all(split)
            write_cache(path, arrays)
        return arrays


def open_folder(
    path: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> FolderSource:
    """Opens the folder ``path`` as a dataset; every check of the input happens here.

    Args:
      path: the dataset folder (``PATH/<class>/*`` or ``PATH/train/<class>/*`` ...).
      image_size: side (px) every image is resized to; None or 0: the images' own size, which
        must then be the same for all of them.
      channels: 1 (grey) or 3 (RGB); None or 0: the majority's.
      validation_fraction: share of train carved out as validation when there is no
        validation folder.
      test_fraction: share of train carved out as test when there is no test folder.
      seed: chooses which files are carved out (the same on every machine).
      cache_dir: where ``arrays`` keeps decoded splits; None: ``default_cache_dir()``.

    Raises:
      ConfigError: one line naming the offending path or value.
    """
    root = _check_arguments(path, image_size, channels, validation_fraction, test_fraction)
    folders = split_folders(root)
    class_names = _class_names(folders)
    found = {
        s: [scan_class(root, folder / c) for c in class_names] for s, folder in folders.items()
    }
    headers = read_headers(root, [f for by_class in found.values() for fs in by_class for f in fs])
    fractions = {"test": test_fraction, "validation": validation_fraction}
    fractions = {s: f for s, f in fractions.items() if s not in folders and f > 0}
    by_split = carve(found["train"], fractions, seed)
    by_split.update({s: by_class for s, by_class in found.items() if s != "train"})
    shape = image_shape(headers, image_size, channels, root)
    splits = {
        s: _split(root, by_split[s], headers, shape)
        for s in ("train", "validation", "test")
        if sum(map(len, by_split.get(s, []))) > 0
    }
    cache = str(default_cache_dir() if cache_dir is None else cache_dir)
    return FolderSource(f"folder:{root}", shape, tuple(class_names), splits, cache)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cnnjax/folders``, by default ``~/.cache/cnnjax/folders``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "cnnjax", "folders")


def _check_arguments(path, image_size, channels, validation_fraction, test_fraction) -> Path:
    """The dataset folder as an absolute path (symbolic links kept, as the user named it)."""
    if image_size is not None and (not isinstance(image_size, int) or image_size < 0):
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size!r}")
    if channels not in (None, 0, 1, 3):
        raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    fractions = (validation_fraction, test_fraction)
    if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(
            f"validation_fraction and test_fraction must be in [0, 1) with a sum below 1, "
            f"got {validation_fraction} and {test_fraction}"
        )
    if not str(path).strip():  # "folder:" alone would be the current directory
        raise ConfigError("the dataset folder is empty: --config.dataset=folder:PATH")
    root = Path(os.path.abspath(os.path.expanduser(path)))
    if not root.exists():
        raise ConfigError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} is a file, not a folder of class folders")
    return root


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the folders in ``folder`` that are not ignored."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _ignored(e.name))
    except OSError as e:
        raise ConfigError(f"{folder}: cannot list the folder ({e.strerror})") from None


def split_folders(root: Path) -> dict[str, Path]:
    """``train`` (and ``validation``, ``test`` where present) -> folder of class folders.

    Without a ``train`` folder, ``root`` itself is train.
    """
    names = _subfolders(root)
    if "train" not in names:
        splits = [n for n in names if n in SPLIT_FOLDERS]
        if splits:
            raise ConfigError(
                f"{root} has split folders ({', '.join(splits)}) but no train folder: add "
                f"{root}/train/<class>/..., or use class folders alone"
            )
        return {"train": root}
    unknown = [n for n in names if n not in SPLIT_FOLDERS]
    if unknown:
        raise ConfigError(
            f"{root} has a train folder, so its other folders must be split folders "
            f"(validation or val, test); found {unknown[0]!r}: move it into train/ or elsewhere"
        )
    if "val" in names and "validation" in names:
        raise ConfigError(f"{root} has both a validation and a val folder: keep one")
    return {SPLIT_FOLDERS[n]: root / n for n in names}


def _class_names(folders: dict[str, Path]) -> list[str]:
    """The class folder names of train, checked against the other split folders."""
    train = _subfolders(folders["train"])
    if not train:
        images = [p.name for p in folders["train"].iterdir() if _is_image_name(p.name)]
        hint = (
            f" (it has images, e.g. {images[0]}: put each class in a subfolder)" if images else ""
        )
        raise ConfigError(
            f"{folders['train']} has no class folders: expected "
            f"{folders['train']}/<class>/<image files>{hint}"
        )
    if len(train) == 1:
        raise ConfigError(
            f"{folders['train']} has one class folder ({train[0]}): a classifier needs two or more"
        )
    for split, folder in folders.items():
        other = _subfolders(folder)
        if other != train:
            missing = sorted(set(train) - set(other)) or "none"
            extra = sorted(set(other) - set(train)) or "none"
            raise ConfigError(
                f"the class folders of {folder} differ from those of {folders['train']}: "
                f"missing in {split}: {', '.join(missing)}; only in {split}: {', '.join(extra)}"
            )
    return train


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_class(root: Path, folder: Path) -> list[str]:
    """The image files under class folder ``folder`` (recursively), as sorted POSIX paths
    relative to ``root``.

    Raises:
      ConfigError: a file that is not ignored and not named as an image; no image at all.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise_walk_error):
        # Sorted, so that of several bad files the same one is named on every file system.
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))  # also prunes the walk
        for name in sorted(filenames):
            if _ignored(name):
                continue
            path = os.path.join(dirpath, name)
            if not _is_image_name(name):
                raise ConfigError(
                    f"{path}: not an image file (accepted: {' '.join(IMAGE_EXTENSIONS)}, any "
                    f"case; hidden files are ignored): move it out of the dataset folder"
                )
            files.append(Path(path).relative_to(root).as_posix())
    if not files:
        raise ConfigError(f"{folder}: class folder without images ({' '.join(IMAGE_EXTENSIONS)})")
    return sorted(files)


def _raise_walk_error(error: OSError):
    raise ConfigError(f"{error.filename}: cannot list the folder ({error.strerror})")


def read_headers(root: Path, files: Sequence[str]) -> dict[str, Header]:
    """The header of every file (threads: reading many small files waits on the disk).

    Raises:
      ConfigError: the first file (in ``files`` order) PIL cannot identify as an image.
    """
    with ThreadPoolExecutor() as pool:
        return dict(zip(files, _ordered(pool, lambda f: read_header(root / f), files), strict=True))


def read_header(path: Path) -> Header:
    """Mode and displayed size of the image file ``path``, without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        stat = path.stat()
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            width, height = img.size
            # JPEG and WebP parse EXIF with the header; a PNG's may follow the pixels (its
            # getexif would decode them), so orientation is looked up only where it is at hand.
            if "exif" in img.info and img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            return Header(img.mode, (width, height), stat.st_size, stat.st_mtime_ns)
    except UnidentifiedImageError:
        reason = f"not an image PIL can read as {'/'.join(IMAGE_FORMATS)}: remove or replace it"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = f"unreadable image header ({_first_line(e)})"
    raise ConfigError(f"{path}: {reason}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]`` on ``pool``; the first failure in ``items`` order is raised
    and the calls not yet started are cancelled (a bad file does not wait for the rest)."""
    futures = [pool.submit(fn, x) for x in items]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def majority_channels(modes: Iterable[str]) -> int:
    """1 when most of ``modes`` (PIL modes) are grey, else 3 (a tie included)."""
    modes = list(modes)
    grey = sum(m in GREY_MODES for m in modes)
    return 1 if grey > len(modes) - grey else 3


def image_shape(
    headers: dict[str, Header], image_size: int | None, channels: int | None, root: Path
) -> tuple[int, int, int]:
    """(H, W, C) of the decoded examples: ``image_size`` square, else the images' common size.

    Raises:
      ConfigError: no ``image_size`` and two images of different sizes (naming both).
    """
    c = channels or majority_channels(h.mode for h in headers.values())
    if image_size:
        return (image_size, image_size, c)
    (first, first_header), *rest = headers.items()
    for file, header in rest:
        if header.size != first_header.size:
            sizes = [
                f"{root / f} is {w}x{h}"
                for f, (w, h) in ((first, first_header.size), (file, header.size))
            ]
            raise ConfigError(
                f"the images differ in size ({'; '.join(sizes)}): choose the side they are "
                f"resized to with --config.data.image_size"
            )
    width, height = first_header.size
    return (height, width, c)


def _rank(seed: int, file: str) -> str:
    """A file's place in the carving order: a hash of the seed and its relative path only, so
    the order is the same on every machine whatever order the files were listed or made in."""
    return hashlib.sha256(f"{seed}:{file}".encode()).hexdigest()


def allocate(ideal: Sequence[float], cap: Sequence[int]) -> list[int]:
    """Integers near ``ideal`` (one per class) that sum to ``round(sum(ideal))``, each at most
    ``cap``: floors, then one more for the largest remainders (ties: the lower index), as
    stratified splitters do. Caps can leave the sum short."""
    counts = [min(math.floor(x), c) for x, c in zip(ideal, cap, strict=True)]
    total = math.floor(sum(ideal) + 0.5)
    for i in sorted(range(len(ideal)), key=lambda i: (math.floor(ideal[i]) - ideal[i], i)):
        if sum(counts) >= total:
            break
        counts[i] += counts[i] < cap[i]
    return counts


def carve(
    by_class: Sequence[Sequence[str]], fractions: dict[str, float], seed: int
) -> dict[str, list[list[str]]]:
    """Splits train's files, class by class, into ``train`` and one split per ``fractions``
    entry (split name -> share of all train files), each split taking its share of every class.

    Each class's files are put in ``_rank`` order; the first split of ``fractions`` takes the
    first files, the next split the next ones, train the rest (at least one of every class).
    ``open_folder`` carves test before validation, so changing ``validation_fraction`` leaves
    the test set as it was.

    Args:
      by_class: for each class, its files (relative paths).
      fractions: e.g. ``{"test": 0.1, "validation": 0.1}``.
      seed: decides the order together with the paths.

    Returns:
      split name -> for each class, its files in that split, sorted.
    """
    rest = [sorted(files, key=lambda f: _rank(seed, f)) for files in by_class]
    carved = {}
    for split, fraction in fractions.items():
        ideal = [fraction * len(files) for files in by_class]
        counts = allocate(ideal, [len(files) - 1 for files in rest])
        carved[split] = [sorted(files[:k]) for files, k in zip(rest, counts, strict=True)]
        rest = [files[k:] for files, k in zip(rest, counts, strict=True)]
    return {"train": [sorted(files) for files in rest], **carved}


def _split(
    root: Path, by_class: list[list[str]], headers: dict[str, Header], shape: tuple
) -> FolderSplit:
    files = tuple(f for class_files in by_class for f in class_files)
    labels = tuple(label for label, fs in enumerate(by_class) for _ in fs)
    listing = [
        [f, label, headers[f].nbytes, headers[f].mtime_ns]
        for f, label in zip(files, labels, strict=True)
    ]
    key = json.dumps([DECODER_VERSION, RESAMPLE, list(shape), listing])
    return FolderSplit(str(root), files, labels, shape, hashlib.sha256(key.encode()).hexdigest())


def decode(path: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The image file ``path`` as uint8 ``image_shape`` (H, W, C), C 1 or 3 (module docstring).

    Raises:
      ConfigError: the file is gone or its pixels do not decode (one line naming it).
    """
    from PIL import Image, ImageOps

    h, w, c = image_shape
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            img.draft(img.mode, (max(h, w), max(h, w)))  # JPEG only: libjpeg scales, >= target
            img = to_8bit(ImageOps.exif_transpose(img))
            mode = "L" if c == 1 else "RGB"
            img = img if img.mode == mode else img.convert(mode)  # a convert copies: ~0.6 ms
            img = img.resize((w, h), Image.Resampling[RESAMPLE.upper()])  # same size: a copy
            return np.asarray(img, np.uint8).reshape(h, w, c)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ConfigError(f"{path}: cannot decode the image ({_first_line(e)})") from None


def to_8bit(img):
    """8-bit grey or RGB: 16/32-bit grey scaled down (PIL's conversion would clip at 255),
    alpha dropped."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        return Image.fromarray((np.asarray(img, np.float64) / 257).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    return img


def decode_all(split: FolderSplit) -> dict:
    """Every example of ``split``: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,)."""
    images = np.empty((len(split), *split.image_shape), np.uint8)
    root = split.root

    def decode_into(i: int) -> None:
        images[i] = decode(os.path.join(root, split.files[i]), split.image_shape)

    # Threads rather than processes: PIL decodes and resizes without the GIL, and threads
    # share ``images`` (no pickling of decoded pixels back). One per core: with small images
    # the Python around each decode holds the GIL, and more threads only contend for it.
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        _ordered(pool, decode_into, range(len(split)))
    return {"image": images, "label": np.asarray(split.labels, np.int32)}


def read_cache(path: Path, split: FolderSplit) -> dict | None:
    """The cached arrays of ``split`` at ``path``, or None when missing, unreadable, damaged
    (zipfile checks each member's CRC-32 as it is read to the end), or not of this split."""
    try:
        with np.load(path, allow_pickle=False) as f:
            image, label = f["image"], f["label"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = image.shape == (len(split), *split.image_shape) and image.dtype == np.uint8
    ok = ok and label.dtype == np.int32 and np.array_equal(label, split.labels)
    return {"image": image, "label": label} if ok else None


def write_cache(path: Path, arrays: dict) -> None:
    """Writes ``arrays`` to ``path`` atomically (a temporary file, then a rename); a folder that
    cannot be written only skips the cache, with a warning."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            # Uncompressed: decoded photos compress poorly and zlib would slow every read.
            np.savez(f, **arrays)
        tmp.replace(path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"not caching the decoded images in {path.parent}: {e}", stacklevel=3)
