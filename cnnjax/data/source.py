"""The data interface: a ``Source`` is a dataset (metadata and named splits, each split random
access, decoded); a feed (``cnnjax.data.feed``) turns one into batches, resident on the device or
streamed from the host. Adding a kind of dataset is one file that implements ``Source``
(``tfds.TfdsSource``, ``folder.FolderSource``).

Every example is ``{"image": uint8 (H, W, C), "label": int}``; a source whose images differ in
size resizes them to ``image_shape`` itself (a batch has one shape).
"""

from typing import Protocol

import numpy as np


class Split(Protocol):
    """One split, random access: ``len(split)`` examples, ``split[i]`` decoded."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


class Source(Protocol):
    """A dataset: its metadata and its splits.

    Attributes:
      name: how runs record it (``fashion_mnist``, ``folder:/data/pets``).
      image_shape: (H, W, C) of every decoded example.
      class_names: one name per label, in label order.
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]

    def split_sizes(self) -> dict[str, int]:
        """Number of examples of each split the dataset has (``train``, maybe ``validation``
        and ``test``)."""
        ...

    def split(self, name: str) -> Split:
        """Random access to split ``name`` (a key of ``split_sizes``)."""
        ...

    def arrays(self, name: str) -> dict:
        """All of split ``name`` decoded: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,)
        (kept in a cache where the source can, so a second run reads one file)."""
        ...


def gather(split: Split, indices) -> dict:
    """Examples ``indices`` of ``split`` stacked: ``image`` uint8 (N, H, W, C), ``label`` int32
    (N,). The reference way to build arrays from any ``Split``; one that reads many examples at
    once offers ``_getitems`` (Grain's name for it), used when there."""
    getitems = getattr(split, "_getitems", None)
    examples = getitems(indices) if getitems else [split[int(i)] for i in indices]
    return {
        "image": np.stack([e["image"] for e in examples]).astype(np.uint8),
        "label": np.asarray([e["label"] for e in examples], np.int32),
    }


def parse_split(spec: str) -> tuple[str, int | None, int | None]:
    """``"train[:54000]"`` -> ``("train", None, 54000)``: a split name with an optional slice of
    its examples, written as TFDS writes it (every source accepts these)."""
    name, _, rest = spec.partition("[")
    if not rest:
        return name, None, None
    start, _, stop = rest.rstrip("]").partition(":")
    return name, int(start) if start else None, int(stop) if stop else None


def limited(spec: str, size: int, limit: int) -> str:
    """``spec`` (of ``size`` examples) cut to its first ``limit`` examples, as a split string:
    ``"train[:54000]"`` limited to 512 -> ``"train[0:512]"``; ``"train[54000:]"`` ->
    ``"train[54000:54512]"``; never past the end of the slice."""
    name, start, _ = parse_split(spec)
    start = start or 0
    return f"{name}[{start}:{start + min(limit, size)}]"


class Resized:
    """``split`` with every image resized to ``size`` x ``size`` (``resize``): a ``Split`` of one
    shape from a dataset whose images differ in size."""

    def __init__(self, split: Split, size: int):
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        example = self.split[index]
        return {**example, "image": resize(example["image"], (self.size, self.size))}


def resize(image, shape: tuple[int, int], box: tuple[int, int, int, int] | None = None):
    """uint8 ``image`` (H, W, C), C 1 or 3, or its ``box`` (left, top, right, bottom), resized
    to ``shape`` (h, w) with PIL's bilinear filter (antialiased when it shrinks): uint8
    (h, w, C)."""
    from PIL import Image

    image = np.asarray(image, np.uint8)
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    if box is not None:
        pil = pil.crop(box)
    out = np.asarray(pil.resize(shape[::-1], Image.Resampling.BILINEAR))
    return out.reshape(*shape, channels)


def count(spec: str, sizes: dict[str, int]) -> int:
    """Examples in split ``spec`` (a name or a slice of one) of a dataset of split ``sizes``."""
    name, start, stop = parse_split(spec)
    return len(range(sizes[name])[start:stop])
