"""``Rule``: what one user-set value accepts, as a sentence and a predicate.

Shared by the config checks (``cnnjax.configs.validation``) and the augmentation parameters
(``cnnjax.data.augment``), so every "must be ..." message reads the same way. ``accepts``
completes the sentence "X must be ...".
"""

import dataclasses
import math
import re
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one value accepts: ``accepts`` completes the sentence "must be ..."."""

    accepts: str
    ok: Callable[[object], bool]


def is_number(value) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a number to a user)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def interval(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> str:
    """``">= 0"``, ``"> 0"``, ``"in [0, 1)"``... ("" when unbounded both ways)."""
    if hi == math.inf:
        return "" if lo == -math.inf else f"{'>' if lo_open else '>='} {lo}"
    if lo == -math.inf:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def number(
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    integer: bool = False,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = False,
) -> Rule:
    """A number (an int if ``integer``; finite if ``finite``) between ``lo`` and ``hi``, each
    bound included unless open."""

    def ok(v):
        if not is_number(v) or (integer and not isinstance(v, int)):
            return False
        if finite and not math.isfinite(v):
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    kind = "an integer" if integer else ("a finite number" if finite else "a number")
    bounds = interval(lo, hi, lo_open, hi_open)
    return Rule(f"{kind} {bounds}".strip(), ok)


def pair(lo: float, hi: float, ordered: bool = True) -> Rule:
    """A pair of numbers in [lo, hi], with ``low <= high`` if ``ordered``."""

    def ok(v):
        if not (isinstance(v, tuple) and len(v) == 2 and all(map(is_number, v))):
            return False
        return lo <= min(v) and max(v) <= hi and (v[0] <= v[1] or not ordered)

    order = " with low <= high" if ordered else ""
    return Rule(f"a pair (low, high) {interval(lo, hi)}{order}", ok)


def either(*rules: Rule) -> Rule:
    """Any one of ``rules``."""
    return Rule(" or ".join(r.accepts for r in rules), lambda v: any(r.ok(v) for r in rules))


def choice(*words: str) -> Rule:
    """One of ``words``."""
    return Rule(f"one of {', '.join(words)}", lambda v: v in words)


def increasing(lo: float, hi: float) -> Rule:
    """A tuple or list of numbers in (lo, hi), strictly increasing (may be empty)."""

    def ok(v):
        if not isinstance(v, tuple | list) or not all(map(is_number, v)):
            return False
        steps = zip(v[:-1], v[1:], strict=True)
        return all(lo < x < hi for x in v) and all(a < b for a, b in steps)

    return Rule(f"increasing numbers in ({lo}, {hi}), e.g. (0.5, 0.75)", ok)


def _compiles(pattern) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


NONE = Rule("None", lambda v: v is None)
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
STRING = Rule("a string", lambda v: isinstance(v, str))
REGEX = Rule("a valid regular expression", lambda v: isinstance(v, str) and _compiles(v))
