"""A lock between the worker processes of a test server. Strictly for the test apps."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["one_process_at_a_time"]


@contextmanager
def one_process_at_a_time(path: str | Path) -> Iterator[None]:
    """The block run by one process at a time: an exclusive ``flock`` of *path* (created if need be) while it runs.

    The test apps create their SQLite business database under it: two workers switching the same database to WAL
    together can fail at once with "database is locked" (SQLite does not wait for that lock: it would deadlock),
    whatever the busy timeout.
    """
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
