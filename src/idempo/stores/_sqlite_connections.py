"""The SQLite stores' connections: how each one is set up, where it lives, the checkpoints that keep the WAL bounded,
and what a fork changes. Strictly private: the operations, and how they wait for a lock, are ``sqlite.py``'s.

Where connections live. An async store's connections in one process are a :class:`StoreThread`: a thread of the
store's own with its own connection, where the schema is made and where anything that may wait for the disk runs,
and, inline, a second connection used on the event loop's thread, which never checkpoints. A sync store's are a
:class:`Pool`: each operation takes a connection that no other thread is using, so threads never share one.

Checkpoints, and a bounded WAL. SQLite's automatic checkpoint is PASSIVE: it copies what it can without stopping
writers, and the WAL is rewound to its start only when a checkpoint has caught up with every write. Under sustained
load the loop (or the other threads of a sync store) kept writing while the store's thread checkpointed, so no
checkpoint ever caught up and the WAL grew without bound (35 KB a request). So each store, in each process,
checkpoints every ``CHECKPOINT_EVERY`` operations that wrote (that changed a row: a read, such as a replay's claim,
adds nothing to the WAL), in two steps (:class:`Checkpoints`): a PASSIVE checkpoint, which does the bulk of the
copying beside the writers; then, with the store's own operations held back (on the async store they queue on its
thread, behind the checkpoint; on the sync store they wait for it), a RESTART checkpoint, which takes the write lock,
copies the few pages written meanwhile and waits for readers to leave the WAL, so that the next write starts it
again from the beginning. ``journal_size_limit`` then cuts the file back after a burst. The WAL file
is kept, not truncated: a file reused from its start needs no new disk space, so a full disk still takes small
writes.

Forks. A store notices a ``fork`` and opens fresh connections (and a fresh thread) in the child; the connections it
inherited are kept open, never used, for as long as the child lives (:func:`inherit`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .._core.errors import StoreError, StoreFullError

__all__ = [
    "CHECKPOINT_EVERY",
    "PROCESS",
    "Busy",
    "Checkpoints",
    "Database",
    "Pool",
    "StoreThread",
    "fork_lock",
    "inherit",
    "run_operation",
]

T = TypeVar("T")
logger = logging.getLogger("idempo")

CHECKPOINT_EVERY = 1000  # operations that wrote, of one store in one process, between two checkpoints
_CHECKPOINT_WAIT_MS = 100  # how long a RESTART checkpoint waits for the write lock and for readers
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes of WAL file kept after it is rewound
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

# Connections a forked child inherited from its parent. SQLite forbids using them in the child, closing included
# (closing drops every POSIX lock this process holds on the file, and may checkpoint or delete the WAL), so they
# are kept here, never closed, for as long as the child lives.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []
# Taken only when a sync store first finds itself in a new process; made anew in every child, so that a lock some
# other thread of the parent held at the moment of the fork can never block the child.
_FORK_LOCK = threading.Lock()


class _Process:
    """This process's id, kept up to date across forks: what a store compares with its connections' to tell whether
    they are its own, on every operation, without a system call."""

    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = os.getpid()


PROCESS = _Process()


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()
    PROCESS.pid = os.getpid()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_new_fork_lock)


def fork_lock() -> threading.Lock:
    """The lock a sync store takes to replace its pool when it finds itself in a new process."""
    return _FORK_LOCK


def inherit(connections: list[sqlite3.Connection]) -> None:
    """This process was forked from the one that opened *connections*: never use (nor close) them."""
    _INHERITED_CONNECTIONS.extend(connections)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)  # pragma: no cover - Python builds without error codes


class Busy(Exception):
    """An attempt that did nothing, because the database was locked (*cause*), or because the operation's deadline
    passed before its turn came (*cause* ``None``); the operation may be tried again until its deadline. It never
    leaves the store."""

    def __init__(self, cause: sqlite3.Error | None) -> None:
        super().__init__(cause)
        self.cause = cause


class Database:
    """One store's database: the file, the table and the durability every connection is opened with, and what
    their failures mean."""

    def __init__(self, path: str, table: str, synchronous: str) -> None:
        self.path = path
        self.table = table
        self.synchronous = synchronous

    def connect(self) -> sqlite3.Connection:
        """A connection of the store's own, set up, the schema made. Its busy timeout is zero: no statement ever
        waits inside SQLite."""
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            self._configure(conn)
            # Switching to WAL needs a moment of exclusive access, which another process starting at the same time
            # may hold: then this fails with SQLITE_BUSY, and the operation that is opening the connection tries again.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " key TEXT PRIMARY KEY,"
                " state INTEGER NOT NULL,"
                " fingerprint TEXT NOT NULL,"
                " token TEXT NOT NULL,"
                " created_at REAL NOT NULL,"
                " lease_expires_at REAL NOT NULL,"
                " expires_at REAL NOT NULL,"
                " payload BLOB"
                ") WITHOUT ROWID"
            )
            # No index on expires_at: keeping one up to date cost every new key about 8 µs (a claim inserts into it,
            # a completion moves its entry: two more pages to write per commit), for the sake of purge_expired,
            # which walks the table in key order instead. Earlier versions made one: it goes, once.
            conn.execute(f"DROP INDEX IF EXISTS {self.table}_expires_at")
        except BaseException:  # e.g. the file is not a database: do not leave the connection to the collector
            conn.close()
            raise
        return conn

    def connect_inline(self) -> sqlite3.Connection:
        """A connection for the event loop's thread, once a store's thread has made the schema."""
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        """What every connection of a store sets: no waiting inside SQLite, the durability asked for, checkpoints
        left to :class:`Checkpoints`, and the WAL file cut back after a burst."""
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")

    def error(self, exc: sqlite3.Error) -> StoreError:
        """The error a store raises for *exc*: :class:`~idempo.StoreFullError` for a full disk (or a file at its
        size limit), else :class:`~idempo.StoreError`."""
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        kind = StoreFullError if full else StoreError
        return kind(f"SQLite store {self.path!r}: {type(exc).__name__}: {exc}")

    def failure(self, exc: sqlite3.Error) -> Exception:
        """What a failed statement raises: :class:`Busy` when it found the database locked (it did nothing, and
        may be tried again), else the :class:`~idempo.StoreError` the caller gets."""
        return Busy(exc) if _is_busy(exc) else self.error(exc)


def run_operation(conn: sqlite3.Connection, operation: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, bool]:
    """*operation* run on *conn* with *args*: its result, and whether it wrote (changed a row: only such operations
    count towards a checkpoint, see :meth:`Checkpoints.due`). Every operation of either SQLite store runs here."""
    changes = conn.total_changes
    result = operation(conn, *args)
    return result, conn.total_changes != changes


class Checkpoints:
    """The checkpoints of one store in one process (see the module's docstring): counted operations, and the gate
    that holds the store's operations back while a RESTART checkpoint runs."""

    def __init__(self, path: str, opened: threading.Condition | None = None) -> None:
        self.path = path
        self.count = 0  # writes since the last checkpoint (a race between threads may lose one: harmless)
        self.running = False
        self.closed = False  # the gate: while True, the store's operations wait for the checkpoint
        self.opened = threading.Condition(threading.Lock()) if opened is None else opened  # notified as it opens

    def due(self) -> bool:
        """Count one operation that wrote. ``True`` when a checkpoint is due: the caller must then :meth:`run` it.

        Only operations that changed a row count (:func:`run_operation` tells, from the connection's
        ``total_changes`` before and after): one that changed none, a replay's read above all, adds nothing to the
        WAL, so a store that mostly replays checkpoints no more often than its writes need (a checkpoint every 1000
        reads cost a replay 0.35 µs, and held the store's operations back while it restarted the WAL)."""
        self.count += 1
        if self.count < CHECKPOINT_EVERY:
            return False
        with self.opened:
            if self.running:
                return False
            self.running = True
            self.count = 0
        return True

    def run(self, conn: sqlite3.Connection | None) -> None:
        """The checkpoint :meth:`due` asked for, on *conn* (``None``: the store was closed meanwhile). Never raises:
        the operation that made it due has taken effect."""
        try:
            if conn is not None:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                with self.opened:
                    self.closed = True
                conn.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_WAIT_MS}")
                try:
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                finally:
                    conn.execute("PRAGMA busy_timeout = 0")
                if busy:
                    logger.debug(
                        "idempo: SQLite store %r: checkpoint %d/%d frames, WAL not rewound", self.path, copied, frames
                    )
        except sqlite3.Error as exc:
            logger.warning("idempo: SQLite store %r: checkpoint failed: %s", self.path, exc)
        finally:
            with self.opened:
                self.closed = self.running = False
                self.opened.notify_all()


class StoreThread:
    """The connections of one async store in one process: its thread's (made first: it makes the schema), where
    anything that may wait for the disk runs, and the event loop's (if *inline*), opened once the schema exists."""

    def __init__(self, database: Database, pid: int, inline: bool) -> None:
        self.database = database
        self.pid = pid  # -1: not started
        self.inline = inline
        self.executor = None if pid == -1 else ThreadPoolExecutor(max_workers=1, thread_name_prefix="idempo-sqlite")
        self.conn: sqlite3.Connection | None = None  # the thread's
        self.inline_conn: sqlite3.Connection | None = None  # the loop's
        self.inline_lock = threading.Lock()
        self.checkpoints = Checkpoints(database.path)

    def inherit(self) -> None:
        """This process was forked from the one that opened these connections: never use (nor close) them."""
        inherit([c for c in (self.conn, self.inline_conn) if c is not None])

    def on_thread(self, deadline: float | None, operation: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, bool]:
        """Run *operation* on the thread's connection (called on the thread), unless its *deadline* has passed
        meanwhile (``None``: no deadline); return its result, and whether it wrote (changed a row: see
        :meth:`Checkpoints.due`)."""
        if deadline is not None and time.monotonic() > deadline:
            raise Busy(None)  # its time ran out in the queue: fail it without running it
        try:
            if self.conn is None:
                self.conn = self.database.connect()
            return run_operation(self.conn, operation, args)
        except sqlite3.Error as exc:
            raise self.database.failure(exc) from exc

    def open_inline(self) -> None:
        """Open the loop's connection, if it is due: the thread has made the schema."""
        if not self.inline or self.inline_conn is not None or self.conn is None:
            return
        try:
            self.inline_conn = self.database.connect_inline()
        except sqlite3.Error as exc:
            # Only an optimisation, and the operation has already taken effect: never report it as failed.
            logger.warning("idempo: SQLite store %r stays on its thread: %s", self.database.path, exc)

    def checkpoint(self) -> None:
        """Run the checkpoint that is due (called on the thread)."""
        self.checkpoints.run(self.conn)

    def close_connection(self) -> None:
        """Close the thread's connection (called on the thread)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Pool:
    """The connections of one sync store in one process: idle ones wait in ``idle``; a connection is used by one
    thread at a time, taken out of ``idle`` for one operation and put back after it."""

    def __init__(self, database: Database, pid: int) -> None:
        self.database = database
        self.pid = pid  # -1: not started
        # The most connections open at once; None for no limit. Each connection to ":memory:" is a database of its
        # own: it has a single one, and threads take turns on it.
        self.size = 1 if database.path == ":memory:" else None
        self.opened = 0
        self.idle: list[sqlite3.Connection] = []
        self.ready = threading.Condition(threading.Lock())
        self.closed = False
        self.checkpoints = Checkpoints(database.path, self.ready)

    def available(self) -> bool:
        """Whether an operation may take a connection now (call it holding ``ready``)."""
        return not self.checkpoints.closed and (bool(self.idle) or self.size is None or self.opened < self.size)

    def checkout(self, deadline: float) -> sqlite3.Connection:
        """A connection no other thread is using; waits, until *deadline*, for the single connection of
        ``":memory:"``, or for a checkpoint (then raises :class:`Busy`)."""
        with self.ready:
            if not self.available() and not self.ready.wait_for(self.available, timeout=deadline - time.monotonic()):
                raise Busy(None)
            if self.idle:
                return self.idle.pop()
            self.opened += 1
        try:
            return self.database.connect()
        except BaseException as exc:
            with self.ready:
                self.opened -= 1
                self.ready.notify()
            if isinstance(exc, sqlite3.Error):
                raise self.database.failure(exc) from exc
            raise

    def checkin(self, conn: sqlite3.Connection) -> None:
        """Put *conn* back after an operation (or close it: the pool was closed meanwhile, or the operation was
        interrupted inside a transaction)."""
        with self.ready:
            if not self.closed and not conn.in_transaction:
                self.idle.append(conn)
                self.ready.notify()
                return
            self.opened -= 1
            self.ready.notify()
        conn.close()

    def close(self) -> None:
        """Close the idle connections; one still in use is closed when its operation ends."""
        with self.ready:
            self.closed = True
            idle, self.idle = self.idle, []
            self.opened -= len(idle)
        for conn in idle:
            conn.close()
