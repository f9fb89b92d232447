"""``sqlite:///path.db``: the embedded default store, on the standard library's ``sqlite3``.

Theory of operation: one SQLite file may be shared by several worker processes of one machine. The database is
in WAL mode, so readers never wait for the writer; every write is a single statement in autocommit, or, for a
claim that may take a key over, an ``IMMEDIATE`` transaction (the write lock is taken first, so two processes
can never both see the key free). A replay is a plain read: completed records never change until they expire.

Waiting for a lock. No statement ever waits inside SQLite (every connection's busy timeout is zero): a statement
that finds the write lock taken fails at once with ``SQLITE_BUSY``, having done nothing, and the operation is tried
again after a pause (1 ms, 2 ms, 5 ms ... 100 ms, SQLite's own busy handler's steps), until its deadline: *busy_timeout*
after the operation was called, whatever happened to it meanwhile. So each operation gets its answer within its own
bound, and operations that wait for the lock hold up nothing else: a wait is a timer, not a thread blocked in
SQLite (with one thread blocked per wait, the n-th operation of a queue got its error after n busy timeouts).

What runs where. Waiting must never happen on the event loop: not for another process's lock, not for an
fsync. Each store has a thread of its own with its own connection, where the schema is made and where anything
that may wait for the disk runs. But handing a statement to a thread and back costs far more than the statement
itself (a thread wake-up each way: 100-300 µs on small virtual machines, against 10-60 µs for a read or a WAL
append). So, by default (``inline=True``), each operation runs on the event loop's thread through a second
connection; it either finishes at once or fails with ``SQLITE_BUSY`` without waiting, and its pauses are timers on
the loop. That connection never checkpoints (the fsyncs of a checkpoint happen on the store's thread). With
``synchronous="FULL"`` every commit fsyncs, so every statement runs on the thread; ``inline=False`` asks for that
too, e.g. on a slow or network file system. An operation that waited on the thread's queue past its deadline fails
without being run.

Checkpoints, and a bounded WAL. SQLite's automatic checkpoint is PASSIVE: it copies what it can without stopping
writers, and the WAL is rewound to its start only when a checkpoint has caught up with every write. Under sustained
load the loop (or the other threads of a sync store) kept writing while the store's thread checkpointed, so no
checkpoint ever caught up and the WAL grew without bound (35 KB a request). So each store, in each process,
checkpoints every ``_CHECKPOINT_EVERY`` operations, in two steps: a PASSIVE checkpoint, which does the bulk of the
copying beside the writers; then, with the store's own operations held back (on the async store they queue on its
thread, behind the checkpoint; on the sync store they wait for it), a RESTART checkpoint, which takes the write lock,
copies the few pages written meanwhile and waits for readers to leave the WAL, so that the next write starts it
again from the beginning. ``journal_size_limit`` then cuts the file back after a burst. The WAL file is kept, not
truncated: a file reused from its start needs no new disk space, so a full disk still takes small writes.

The store notices a ``fork`` and opens fresh connections and a fresh thread in the child.

:class:`SyncSQLiteStore`, the blocking twin (``SQLiteStore.sync()``, ``sync_store_from_url``), runs the same
operations, over the same connection setup, on the caller's thread, pausing between attempts with the same steps
and the same deadline: it keeps a pool of connections, and each operation takes one that no other thread is using,
so threads never share a connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

from .._core.errors import ConfigurationError, StoreError, StoreFullError
from .._core.records import Acquired, Claim, Existing, Record, new_token
from ._rows import COMPLETED, IN_PROGRESS, record_from_row
from ._scan import Page, keyset_plan, prefix_end, run_plan, run_plan_async
from ._url import StoreURL

__all__ = ["SQLiteStore", "SyncSQLiteStore"]

T = TypeVar("T")
logger = logging.getLogger("idempo")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_COLUMNS = "key, state, fingerprint, token, created_at, lease_expires_at, expires_at, payload"
# Connections a forked child inherited from its parent. SQLite forbids using them in the child, closing included
# (closing drops every POSIX lock this process holds on the file, and may checkpoint or delete the WAL), so they
# are kept here, never closed, for as long as the child lives.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []
# Taken only when a store first finds itself in a new process; made anew in every child, so that a lock some other
# thread of the parent held at the moment of the fork can never block the child.
_FORK_LOCK = threading.Lock()


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_new_fork_lock)


_CHECKPOINT_EVERY = 1000  # operations of one store, in one process, between two checkpoints
_CHECKPOINT_WAIT_MS = 100  # how long a RESTART checkpoint waits for the write lock and for readers
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes of WAL file kept after it is rewound
# Seconds between two attempts of an operation that found the database locked: the steps of SQLite's own busy
# handler (sqliteDefaultBusyCallback), then 100 ms until the operation's deadline.
_PAUSES = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)
_SCAN_PAGE = 100  # records per statement of a scan (payloads included: each may be large)
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)  # pragma: no cover - Python builds without error codes


class _Busy(Exception):
    """An attempt that did nothing, because the database was locked (*cause*), or because the operation's deadline
    passed before its turn came (*cause* ``None``); the operation may be tried again until its deadline. Strictly
    private: it never leaves the store."""

    def __init__(self, cause: sqlite3.Error | None) -> None:
        super().__init__(cause)
        self.cause = cause


class _Checkpoints:
    """The checkpoints of one store in one process (see the module's docstring): counted operations, and the gate
    that holds the store's operations back while a RESTART checkpoint runs. Strictly private."""

    def __init__(self, path: str, opened: threading.Condition | None = None) -> None:
        self.path = path
        self.count = 0  # operations since the last checkpoint (a race between threads may lose one: harmless)
        self.running = False
        self.closed = False  # the gate: while True, the store's operations wait for the checkpoint
        self.opened = threading.Condition(threading.Lock()) if opened is None else opened  # notified as it opens

    def due(self) -> bool:
        """Count one operation. ``True`` when a checkpoint is due: the caller must then :meth:`run` it."""
        self.count += 1
        if self.count < _CHECKPOINT_EVERY:
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


class _SQLiteBase:
    """What :class:`SQLiteStore` and :class:`SyncSQLiteStore` share: the options, the connection setup, the SQL and
    the operations, each a plain function of a ``sqlite3`` connection. Strictly private."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str,
        busy_timeout: float,
        synchronous: str,
        clock: Callable[[], float],
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            msg = f"table name {table!r} must be letters, digits and underscores"
            raise ConfigurationError(msg)
        if synchronous.upper() not in _SYNCHRONOUS:
            msg = f"synchronous={synchronous!r}; expected one of {', '.join(_SYNCHRONOUS)}"
            raise ConfigurationError(msg)
        if busy_timeout < 0:
            msg = f"busy_timeout must not be negative, not {busy_timeout}"
            raise ConfigurationError(msg)
        self._path = os.fspath(path)
        if self._path != ":memory:":
            # Connections open lazily (and again after a fork): pin a relative path to today's working directory.
            self._path = os.path.abspath(self._path)
        if self._path != ":memory:" and not Path(self._path).resolve().parent.is_dir():
            msg = f"the directory of SQLite store {self._path!r} does not exist"
            raise ConfigurationError(msg)
        self._table = table
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._clock = clock
        self._sql_claim_read = f"SELECT {_COLUMNS} FROM {table} WHERE key = ?"
        self._sql_claim_write = (
            f"INSERT OR REPLACE INTO {table} ({_COLUMNS}) VALUES (?, {IN_PROGRESS}, ?, ?, ?, ?, ?, NULL)"
        )
        self._sql_renew = (
            f"UPDATE {table} SET lease_expires_at = ? "
            f"WHERE key = ? AND token = ? AND state = {IN_PROGRESS} AND expires_at > ?"
        )
        self._sql_complete = (
            f"UPDATE {table} SET state = {COMPLETED}, token = '', payload = ?, lease_expires_at = ?, expires_at = ? "
            f"WHERE key = ? AND token = ? AND state = {IN_PROGRESS} AND expires_at > ?"
        )
        self._sql_release = (
            f"DELETE FROM {table} WHERE key = ? AND token = ? AND state = {IN_PROGRESS} AND expires_at > ?"
        )
        self._sql_get = f"SELECT {_COLUMNS} FROM {table} WHERE key = ? AND expires_at > ?"
        self._sql_delete = f"DELETE FROM {table} WHERE key = ?"
        self._sql_purge = f"DELETE FROM {table} WHERE expires_at <= ?"
        self._scan_page_size = _SCAN_PAGE

    @staticmethod
    def _path_from_url(url: StoreURL, options: dict[str, Any]) -> str:
        """The file a ``sqlite:`` URL names; fills *options* with the query options both stores take."""
        if url.netloc:
            msg = f"a SQLite URL has no host: write 'sqlite:///{url.netloc}{url.path}' for a relative path"
            raise ConfigurationError(msg)
        path = url.path[1:] if url.path.startswith("/") else url.path
        if not path:
            msg = "a SQLite URL needs a file: 'sqlite:///idempo.db' (relative) or 'sqlite:////var/lib/idempo.db'"
            raise ConfigurationError(msg)
        options.setdefault("table", url.option("table", "idempo_records"))
        options.setdefault("busy_timeout", url.float_option("busy_timeout", 5.0))
        options.setdefault("synchronous", url.option("synchronous", "NORMAL"))
        return path

    def _connect(self) -> sqlite3.Connection:
        """A connection of the store's own, set up, the schema made. Its busy timeout is zero: see :meth:`_pause`."""
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(conn)
        except BaseException:  # e.g. the file is not a database: do not leave the connection to the collector
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        self._configure(conn)
        # Switching to WAL needs a moment of exclusive access, which another process starting at the same time may
        # hold: then this fails with SQLITE_BUSY, and the operation that is opening the connection tries again.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table} ("
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
        conn.execute(f"CREATE INDEX IF NOT EXISTS {self._table}_expires_at ON {self._table} (expires_at)")

    def _configure(self, conn: sqlite3.Connection) -> None:
        """What every connection of a store sets: no waiting inside SQLite, the durability asked for, checkpoints
        left to :class:`_Checkpoints`, and the WAL file cut back after a burst."""
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")

    def _error(self, exc: sqlite3.Error) -> StoreError:
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL  # the disk (or the file's limit)
        kind = StoreFullError if full else StoreError
        return kind(f"SQLite store {self._path!r}: {type(exc).__name__}: {exc}")

    def _failure(self, exc: sqlite3.Error) -> Exception:
        """What a failed statement raises: :class:`_Busy` when it found the database locked (it did nothing, and
        may be tried again), else the :class:`StoreError` the caller gets."""
        return _Busy(exc) if _is_busy(exc) else self._error(exc)

    def _pause(self, deadline: float, tries: int, cause: sqlite3.Error | None) -> float:
        """Seconds to wait before the next attempt of an operation that found the database locked (*cause*, the
        last ``SQLITE_BUSY``; ``None`` if it never got its turn).

        Raises:
            StoreError: the operation's deadline has passed.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if cause is None:
                msg = f"SQLite store {self._path!r}: not run: busy_timeout={self._busy_timeout:g} s ran out in a queue"
            else:
                msg = f"SQLite store {self._path!r}: {type(cause).__name__}: {cause} (for {self._busy_timeout:g} s)"
            raise StoreError(msg) from cause
        return min(_PAUSES[min(tries, len(_PAUSES) - 1)], remaining)

    # -- the operations: plain functions of a connection, run by either store -------------------------------

    def _claim(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, lease: float, ttl: float, token: str | None = None
    ) -> Claim:
        now = self._clock()
        # A live record seen by a plain read is a safe answer: completed records never change, and an
        # in-progress one was in progress at the moment of the read.
        row = conn.execute(self._sql_claim_read, (key,)).fetchone()
        if row is not None and row[6] > now and (row[1] == COMPLETED or row[5] > now):
            return Existing(record_from_row(row))
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = self._clock()
            row = conn.execute(self._sql_claim_read, (key,)).fetchone()
            if row is not None and row[6] > now and (row[1] == COMPLETED or row[5] > now):
                result: Claim = Existing(record_from_row(row))
            else:
                if token is None:
                    token = new_token()
                conn.execute(self._sql_claim_write, (key, fingerprint, token, now, now + lease, now + ttl))
                result = Acquired(token)
            conn.execute("COMMIT")
        except BaseException:
            # COMMIT too may fail (busy, on a database that is not in WAL mode): never leave the connection
            # inside a transaction that holds the write lock.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _renew(self, conn: sqlite3.Connection, key: str, token: str, lease: float) -> bool:
        now = self._clock()
        return conn.execute(self._sql_renew, (now + lease, key, token, now)).rowcount == 1

    def _complete(self, conn: sqlite3.Connection, key: str, token: str, payload: bytes, ttl: float) -> bool:
        now = self._clock()
        return conn.execute(self._sql_complete, (payload, now, now + ttl, key, token, now)).rowcount == 1

    def _release(self, conn: sqlite3.Connection, key: str, token: str) -> bool:
        return conn.execute(self._sql_release, (key, token, self._clock())).rowcount == 1

    def _get(self, conn: sqlite3.Connection, key: str) -> Record | None:
        row = conn.execute(self._sql_get, (key, self._clock())).fetchone()
        return None if row is None else record_from_row(row)

    def _delete(self, conn: sqlite3.Connection, key: str) -> bool:
        return conn.execute(self._sql_delete, (key,)).rowcount == 1

    def _purge_expired(self, conn: sqlite3.Connection) -> int:
        return conn.execute(self._sql_purge, (self._clock(),)).rowcount

    def _scan_page(self, conn: sqlite3.Connection, prefix: str, page: Page) -> list[Record]:
        """One page of a scan: a range of the primary key's index, ``prefix <= key < prefix_end(prefix)``
        (SQLite compares text byte by byte in UTF-8, which is code point order), after ``page.after``."""
        clauses: list[str] = ["expires_at > ?"]
        params: list[object] = [self._clock()]
        if page.after is None:
            clauses.append("key >= ?")
            params.append(prefix)
        else:
            clauses.append("key > ?")
            params.append(page.after)
        end = prefix_end(prefix)
        if end is not None:
            clauses.append("key < ?")
            params.append(end)
        query = f"SELECT {_COLUMNS} FROM {self._table} WHERE {' AND '.join(clauses)} ORDER BY key LIMIT ?"
        return [record_from_row(row) for row in conn.execute(query, (*params, page.size))]


class SQLiteStore(_SQLiteBase):
    """Records in a SQLite file: durable, and safe for several worker processes on one machine.

    Args:
        path: the database file (created if missing; its directory must exist), or ``":memory:"``.
        table: the table's name; created on first use.
        busy_timeout: the most seconds an operation takes, counted from its call, waits for another
            connection's write lock included, before it fails with :class:`~idempo.StoreError` (the middleware's
            503). ``0``: no waiting for a lock, one attempt each.
        synchronous: SQLite's ``synchronous`` setting. ``"NORMAL"`` (the default) survives a crash of the
            process; ``"FULL"`` also survives a power loss, at the cost of an fsync per write.
        clock: seconds since the epoch. Every process sharing the file must use the same clock.
        inline: run statements on the calling thread (none of them waits: see the module's docstring), and only
            the checkpoints on the store's thread. ``False`` runs every statement on the store's thread. Ignored
            (always ``False``) with ``synchronous`` FULL or EXTRA.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "idempo_records",
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
        inline: bool = True,
    ) -> None:
        super().__init__(path, table=table, busy_timeout=busy_timeout, synchronous=synchronous, clock=clock)
        self._lock = threading.Lock()
        self._pid = -1
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        # Not for ":memory:": each connection to it is a database of its own, the loop's would have no table.
        self._inline = inline and self._synchronous in ("OFF", "NORMAL") and self._path != ":memory:"
        self._inline_conn: sqlite3.Connection | None = None
        self._inline_lock = threading.Lock()
        self._checkpoints = _Checkpoints(self._path)
        self._sync_twin: SyncSQLiteStore | None = None

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Query options: ``table``, ``busy_timeout`` (seconds), ``synchronous``, ``inline``.
        """
        path = cls._path_from_url(url, options)
        options.setdefault("inline", (url.option("inline") or "true").lower() not in ("0", "false", "no", "off"))
        return cls(path, **options)

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r}, table={self._table!r})"

    def sync(self) -> SyncSQLiteStore:
        """The blocking twin of this store: the same file, table and options, for the decorator on sync functions.

        Always the same object; :meth:`close` closes its connections too. (For ``":memory:"`` the twin's database
        is a private one of its own, like every connection to ``":memory:"``.)
        """
        with self._lock:
            if self._sync_twin is None:
                self._sync_twin = SyncSQLiteStore(
                    self._path,
                    table=self._table,
                    busy_timeout=self._busy_timeout,
                    synchronous=self._synchronous,
                    clock=self._clock,
                )
            return self._sync_twin

    # -- the thread that owns the connection ----------------------------------------------------------------

    def _executor_for_this_process(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._pid != pid:  # first use, or we are a forked child: the parent's thread and connection are not ours
            with self._lock:
                if self._pid != pid:
                    _INHERITED_CONNECTIONS.extend(c for c in (self._conn, self._inline_conn) if c is not None)
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idempo-sqlite")
                    self._conn = None
                    self._inline_conn = None
                    self._inline_lock = threading.Lock()  # another thread of the parent may have held it
                    self._checkpoints = _Checkpoints(self._path)
                    self._pid = pid
        assert self._executor is not None
        return self._executor

    def _on_thread(self, deadline: float, operation: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._busy_timeout and time.monotonic() > deadline:
            raise _Busy(None)  # its time ran out in the queue: fail it without running it
        try:
            if self._conn is None:
                self._conn = self._connect()
            return operation(self._conn, *args)
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc

    def _checkpoint(self, checkpoints: _Checkpoints) -> None:
        checkpoints.run(self._conn)

    async def _run(self, operation: Callable[..., T], *args: Any, inline: bool = True) -> T:
        deadline = time.monotonic() + self._busy_timeout
        executor = self._executor_for_this_process()
        checkpoints = self._checkpoints
        tries, cause = 0, None
        while True:
            # While a checkpoint restarts the WAL, operations queue on the thread behind it.
            conn = self._inline_conn if inline and not checkpoints.closed else None
            try:
                # One connection runs one transaction at a time: if another thread (another event loop) is using
                # it, let the store's thread, which runs one operation at a time, take this one.
                if conn is not None and self._inline_lock.acquire(blocking=False):
                    try:
                        result = operation(conn, *args)
                    except sqlite3.Error as exc:
                        raise self._failure(exc) from exc
                    finally:
                        self._inline_lock.release()
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(executor, self._on_thread, deadline, operation, args)
                    if self._inline and self._inline_conn is None and self._conn is not None:
                        self._open_inline_connection()
            except _Busy as busy:
                cause = busy.cause or cause
                await asyncio.sleep(self._pause(deadline, tries, cause))
                tries += 1
                continue
            if checkpoints.due():
                executor.submit(self._checkpoint, checkpoints)
            return result

    def _open_inline_connection(self) -> None:
        # The store's thread has made the schema; now the loop's own connection can be opened.
        try:
            self._inline_conn = self._connect_inline()
        except sqlite3.Error as exc:
            # Only an optimisation, and the operation has already taken effect: never report it as failed.
            logger.warning("idempo: SQLite store %r stays on its thread: %s", self._path, exc)

    def _connect_inline(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- the Store protocol ---------------------------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return await self._run(self._claim, key, fingerprint, lease, ttl, token)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return await self._run(self._renew, key, token, lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return await self._run(self._complete, key, token, payload, ttl)

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return await self._run(self._release, key, token)

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return await self._run(self._get, key)

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return await self._run(self._delete, key)

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Always on the store's thread: it may delete many rows."""
        return await self._run(self._purge_expired, inline=False)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order, reading pages of 100 records, one
        statement each."""
        plan = keyset_plan(limit, self._scan_page_size)
        return run_plan_async(plan, lambda page: self._run(self._scan_page, prefix, page))

    async def close(self) -> None:
        """Close the connections and stop the store's thread (and close the twin :meth:`sync` returned)."""
        twin = self._sync_twin
        if twin is not None:
            await asyncio.to_thread(twin.close)  # closing the last connection to a file may checkpoint
        if self._pid != os.getpid() or self._executor is None:
            return
        executor = self._executor

        if self._inline_conn is not None:
            self._inline_conn.close()
            self._inline_conn = None

        def close_connection() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, close_connection)
        executor.shutdown(wait=False)
        self._executor = None
        self._pid = -1


class _Pool:
    """The connections of one :class:`SyncSQLiteStore` in one process: idle ones wait in ``idle``; a connection is
    used by one thread at a time, taken out of ``idle`` for one operation and put back after it."""

    def __init__(self, pid: int, size: int | None, path: str) -> None:
        self.pid = pid
        self.size = size  # the most connections open at once; None for no limit
        self.opened = 0
        self.idle: list[sqlite3.Connection] = []
        self.ready = threading.Condition(threading.Lock())
        self.closed = False
        self.checkpoints = _Checkpoints(path, self.ready)

    def available(self) -> bool:
        """Whether an operation may take a connection now (call it holding ``ready``)."""
        return not self.checkpoints.closed and (bool(self.idle) or self.size is None or self.opened < self.size)


class SyncSQLiteStore(_SQLiteBase):
    """Records in a SQLite file, for sync callers: the blocking twin of :class:`SQLiteStore` (``store.sync()``),
    running the same statements on the same table, so the two see each other's records.

    Safe to share between threads: each operation runs on the calling thread over a connection no other thread is
    using at the time (connections are pooled; a pool holds at most as many as ran at once). Threads wait for each
    other only for the write lock, and while a checkpoint restarts the WAL, within *busy_timeout*. For ``":memory:"``
    the store has a single connection (each one would be a database of its own), and threads take turns on it.
    After a ``fork`` the child opens connections of its own.

    Args:
        path: the database file (created if missing; its directory must exist), or ``":memory:"``.
        table: the table's name; created on first use.
        busy_timeout: the most seconds an operation takes, counted from its call, waits included, before it fails
            with :class:`~idempo.StoreError` (see :class:`SQLiteStore`).
        synchronous: SQLite's ``synchronous`` setting (see :class:`SQLiteStore`).
        clock: seconds since the epoch. Every process sharing the file must use the same clock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "idempo_records",
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, table=table, busy_timeout=busy_timeout, synchronous=synchronous, clock=clock)
        self._pool = _Pool(-1, None, self._path)

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Query options: ``table``, ``busy_timeout`` (seconds), ``synchronous``; ``inline`` (an option of the
        async store only) is accepted and ignored, so that one URL serves both.
        """
        path = cls._path_from_url(url, options)
        return cls(path, **options)

    def __repr__(self) -> str:
        return f"SyncSQLiteStore({self._path!r}, table={self._table!r})"

    def _pool_of_this_process(self) -> _Pool:
        pool, pid = self._pool, os.getpid()
        if pool.pid != pid:  # first use, or we are a forked child: the parent's connections are not ours
            with _FORK_LOCK:
                pool = self._pool
                if pool.pid != pid:
                    if pool.pid != -1:
                        # Not under pool.ready: a thread of the parent may have held it at the fork.
                        _INHERITED_CONNECTIONS.extend(pool.idle)
                    pool = self._pool = _Pool(pid, 1 if self._path == ":memory:" else None, self._path)
        return pool

    def _checkout(self, deadline: float) -> tuple[_Pool, sqlite3.Connection]:
        pool = self._pool_of_this_process()
        with pool.ready:
            # Wait, until the deadline, for the single connection of ":memory:", or for a checkpoint.
            if not pool.available() and not pool.ready.wait_for(pool.available, timeout=deadline - time.monotonic()):
                raise _Busy(None)
            if pool.idle:
                return pool, pool.idle.pop()
            pool.opened += 1
        try:
            return pool, self._connect()
        except BaseException as exc:
            with pool.ready:
                pool.opened -= 1
                pool.ready.notify()
            if isinstance(exc, sqlite3.Error):
                raise self._failure(exc) from exc
            raise

    def _checkin(self, pool: _Pool, conn: sqlite3.Connection) -> None:
        with pool.ready:
            if not pool.closed and not conn.in_transaction:
                pool.idle.append(conn)
                pool.ready.notify()
                return
            pool.opened -= 1
            pool.ready.notify()
        conn.close()  # the store was closed meanwhile, or the operation was interrupted inside a transaction

    def _run(self, operation: Callable[..., T], *args: Any) -> T:
        deadline = time.monotonic() + self._busy_timeout
        tries, cause = 0, None
        while True:
            try:
                return self._attempt(deadline, operation, args)
            except _Busy as busy:
                cause = busy.cause or cause
                time.sleep(self._pause(deadline, tries, cause))
                tries += 1

    def _attempt(self, deadline: float, operation: Callable[..., T], args: tuple[Any, ...]) -> T:
        pool, conn = self._checkout(deadline)
        try:
            try:
                result = operation(conn, *args)
            except sqlite3.Error as exc:
                raise self._failure(exc) from exc
            if pool.checkpoints.due():  # this thread checkpoints, as SQLite's own automatic checkpoint would
                pool.checkpoints.run(conn)
            return result
        finally:
            self._checkin(pool, conn)

    # -- the SyncStore protocol -----------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return self._run(self._claim, key, fingerprint, lease, ttl, token)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return self._run(self._renew, key, token, lease)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return self._run(self._complete, key, token, payload, ttl)

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return self._run(self._release, key, token)

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return self._run(self._get, key)

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return self._run(self._delete, key)

    def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`."""
        return self._run(self._purge_expired)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order, reading pages of 100 records, one
        statement each."""
        plan = keyset_plan(limit, self._scan_page_size)
        return run_plan(plan, lambda page: self._run(self._scan_page, prefix, page))

    def close(self) -> None:
        """Close the connections (one still in use is closed when its operation ends). Using the store again
        opens new ones."""
        pool = self._pool_of_this_process()
        with _FORK_LOCK:
            if self._pool is pool:
                self._pool = _Pool(-1, None, self._path)
        with pool.ready:
            pool.closed = True
            idle, pool.idle = pool.idle, []
            pool.opened -= len(idle)
        for conn in idle:
            conn.close()
