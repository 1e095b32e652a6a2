"""``Registry``: things chosen by name (models, optimizers, schedules, augmentations, presets).

Every registry looks names up the same way and fails the same way: an unknown name raises an
``UnknownNameError`` that lists the valid ones.
"""

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from cnnjax.errors import unknown_name

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping name -> entry, filled by ``register``.

    Args:
      kind: what an entry is, for messages ("model", "optimizer", ...).
    """

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        for name, entry in (entries or {}).items():
            self.register(entry, name=name)

    def register(self, entry: T | None = None, *, name: str | None = None):
        """Adds ``entry`` under ``name`` (default: its ``__name__``); without ``entry``, a
        decorator that does so. A name registered twice is a bug: ``ValueError``."""

        def add(e: T) -> T:
            key = name or e.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = e
            return e

        return add if entry is None else add(entry)

    def __getitem__(self, name: str) -> T:
        """The entry ``name``.

        Raises:
          UnknownNameError: (a ``ValueError``) no such name; the message lists the valid ones.
        """
        if name not in self._entries:
            raise unknown_name(self.kind, name, self._entries)
        return self._entries[name]

    def check(self, name: str) -> None:
        """Raises the unknown-name error unless ``name`` is registered."""
        self[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
