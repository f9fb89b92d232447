"""What the stores' ``scan`` implementations share: scans written once as *plans*, run by a sync or an async
runner, and literal prefixes in patterns. Strictly private.

A scan plan is a generator that yields either a request for its runner (a store-specific statement or command,
e.g. :class:`Page`), whose result the runner sends back, or a :class:`~idempo.Record` for the caller of ``scan``.
:func:`run_plan` and :func:`run_plan_async` drive one with blocking or awaited calls, so that the paging, the
limit and the parsing of a scan are the same code in a store and its sync twin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
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
    "run_plan",
    "run_plan_async",
]

_R = TypeVar("_R")

ScanPlan = Generator[_R | Record, Any, None]
"""A scan, written once: it yields requests of type ``_R`` (and receives their results) or records."""


def check_limit(limit: int | None) -> None:
    """Raise ``ValueError`` for a negative scan *limit*."""
    if limit is not None and limit < 0:
        msg = f"limit must be None or at least 0, not {limit}"
        raise ValueError(msg)


class Page(NamedTuple):
    """A request of :func:`keyset_plan`: the first *size* live records, in key order, whose key is greater than
    *after* (``None``: from the first one) and starts with the scan's prefix. The result is a ``list[Record]``."""

    after: str | None
    size: int


def keyset_plan(limit: int | None, page_size: int) -> ScanPlan[Page]:
    """A scan by keyset pagination, for stores that can read records in key order (SQL): page after page, each
    starting after the last key of the one before, until a short page or *limit*. Pages are separate statements,
    so a long scan holds no lock or snapshot, and a record is never listed twice."""
    check_limit(limit)
    after: str | None = None
    remaining = limit
    while remaining is None or remaining > 0:
        size = page_size if remaining is None else min(page_size, remaining)
        records: list[Record] = yield Page(after, size)
        yield from records
        if len(records) < size:
            return
        after = records[-1].key
        if remaining is not None:
            remaining -= len(records)


def run_plan(plan: ScanPlan[_R], execute: Callable[[_R], Any]) -> Iterator[Record]:
    """Drive *plan* with blocking calls: *execute* runs each request and returns its result."""
    reply: Any = None
    try:
        while True:
            try:
                item = plan.send(reply)
            except StopIteration:
                return
            if isinstance(item, Record):
                reply = None
                yield item
            else:
                reply = execute(item)
    finally:
        plan.close()


async def run_plan_async(plan: ScanPlan[_R], execute: Callable[[_R], Awaitable[Any]]) -> AsyncIterator[Record]:
    """Drive *plan* in an event loop: *execute* returns an awaitable of each request's result."""
    reply: Any = None
    try:
        while True:
            try:
                item = plan.send(reply)
            except StopIteration:
                return
            if isinstance(item, Record):
                reply = None
                yield item
            else:
                reply = await execute(item)
    finally:
        plan.close()


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
