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
    (N,). The reference way to build arrays from any ``Split``."""
    examples = [split[int(i)] for i in indices]
    return {
        "image": np.stack([e["image"] for e in examples]).astype(np.uint8),
        "label": np.asarray([e["label"] for e in examples], np.int32),
    }
