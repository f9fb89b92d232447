"""What the stores' ``scan`` implementations share: keyset pagination written once as a plan (see
:mod:`idempo._core.plans`), and literal prefixes in patterns. Strictly private.

A scan is a plan that yields records for the caller of ``scan`` and effects for its store's runner
(:func:`~idempo._core.plans.iterate`, :func:`~idempo._core.plans.iterate_async`), so that the paging, the limit and
the parsing of a scan are the same code in a store and its sync twin.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple, TypeVar

from .._core.records import Record

__all__ = [
    "LIKE_ESCAPE",
    "Page",
    "ScanPlan",
    "check_limit",
    "glob_prefix",
    "keyset_plan",
    "like_prefix",
    "prefix_end",
]

_E = TypeVar("_E")

ScanPlan = Generator[_E | Record, Any, None]
"""A scan, written once: it yields effects of type ``_E`` (and receives their results) or records."""


def check_limit(limit: int | None) -> None:
    """Raise ``ValueError`` for a negative scan *limit*."""
    if limit is not None and limit < 0:
        msg = f"limit must be None or at least 0, not {limit}"
        raise ValueError(msg)


class Page(NamedTuple):
    """One page of :func:`keyset_plan`: the first *size* live records, in key order, whose key is greater than
    *after* (``None``: from the first one) and starts with the scan's prefix."""

    after: str | None
    size: int


def keyset_plan(
    limit: int | None, page_size: int, fetch: Callable[[Page], Generator[_E, Any, list[Record]]]
) -> ScanPlan[_E]:
    """A scan by keyset pagination, for stores that can read records in key order (SQL): page after page, each
    read by the plan *fetch* makes of it and starting after the last key of the one before, until a short page or
    *limit*. Pages are separate statements, so a long scan holds no lock or snapshot, and a record is never listed
    twice."""
    check_limit(limit)
    after: str | None = None
    remaining = limit
    while remaining is None or remaining > 0:
        size = page_size if remaining is None else min(page_size, remaining)
        records = yield from fetch(Page(after, size))
        yield from records
        if len(records) < size:
            return
        after = records[-1].key
        if remaining is not None:
            remaining -= len(records)


def glob_prefix(prefix: str) -> str:
    """A Redis ``MATCH`` pattern for the keys starting with *prefix*, taken literally (``* ? [ ] \\`` escaped)."""
    escaped = "".join("\\" + char if char in "*?[]\\" else char for char in prefix)
    return escaped + "*"


LIKE_ESCAPE = "!"
"""The ``ESCAPE`` character of :func:`like_prefix` patterns (not a backslash, whose meaning in a SQL string
literal depends on ``standard_conforming_strings``)."""


def like_prefix(prefix: str) -> str:
    """A SQL ``LIKE ... ESCAPE '!'`` pattern for the values starting with *prefix*, taken literally."""
    escaped = "".join(LIKE_ESCAPE + char if char in "%_" + LIKE_ESCAPE else char for char in prefix)
    return escaped + "%"


def prefix_end(prefix: str) -> str | None:
    """The least string greater than every string that starts with *prefix* (in code point order), so that
    ``prefix <= key < prefix_end(prefix)`` selects them by an index range; ``None`` if there is none (the
    prefix is empty or only U+10FFFF characters)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates cannot be encoded: the next character is U+E000
        following = 0xE000
    return stripped[:-1] + chr(following)
