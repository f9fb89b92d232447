"""``sqlite:///path.db``: the embedded default store, on the standard library's ``sqlite3``.

Theory of operation: one SQLite file may be shared by several worker processes of one machine. The database is
in WAL mode, so readers never wait for the writer; every write is a single statement in autocommit, or, for a
claim that may take a key over, an ``IMMEDIATE`` transaction (the write lock is taken first, so two processes
can never both see the key free); a busy timeout makes a writer wait for the lock instead of failing. A replay
is a plain read: completed records never change until they expire.

What runs where. Waiting must never happen on the event loop: not for another process's lock, not for an
fsync. Each store has a thread of its own with its own connection (busy timeout set), where the schema is made
and where anything that may wait runs. But handing a statement to a thread and back costs far more than the
statement itself (a thread wake-up each way: 100-300 µs on small virtual machines, against 10-60 µs for a read
or a WAL append). So, by default (``inline=True``), each operation is first tried on the event loop's thread
through a second connection whose busy timeout is zero: it either finishes at once or fails with
``SQLITE_BUSY`` without waiting, and only then is it handed to the store's thread, which waits for the lock.
That connection never checkpoints (``wal_autocheckpoint=0``); the store's thread does, every 1000 writes, so
the fsync of a checkpoint never happens on the loop either. With ``synchronous="FULL"`` every commit fsyncs,
so everything runs on the thread; ``inline=False`` asks for that too, e.g. on a slow or network file system.

The store notices a ``fork`` and opens fresh connections and a fresh thread in the child.

:class:`SyncSQLiteStore`, the blocking twin (``SQLiteStore.sync()``, ``sync_store_from_url``), runs the same
operations, over the same connection setup, on the caller's thread: it keeps a pool of connections (busy timeout
set), and each operation takes one that no other thread is using, so threads never share a connection, and only
wait for each other where SQLite makes them (the write lock, for at most the busy timeout).
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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

from .._core.errors import ConfigurationError, StoreError
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


_CHECKPOINT_EVERY = 1000
_SCAN_PAGE = 100  # records per statement of a scan (payloads included: each may be large)
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)  # pragma: no cover - Python builds without error codes


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _log_failure(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        logger.warning("idempo: SQLite checkpoint failed: %s", exc)


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
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(conn)
        except BaseException:  # e.g. the file is not a database: do not leave the connection to the collector
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        deadline = time.monotonic() + self._busy_timeout
        while True:
            # Switching to WAL needs a moment of exclusive access, which another process starting at the same
            # time may hold; SQLite does not always wait for it on its own.
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
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

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"SQLite store {self._path!r}: {type(exc).__name__}: {exc}")

    # -- the operations: plain functions of a connection, run by either store -------------------------------

    def _claim(self, conn: sqlite3.Connection, key: str, fingerprint: str, lease: float, ttl: float) -> Claim:
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
        busy_timeout: seconds a write waits for another process's lock before the store reports an error.
        synchronous: SQLite's ``synchronous`` setting. ``"NORMAL"`` (the default) survives a crash of the
            process; ``"FULL"`` also survives a power loss, at the cost of an fsync per write.
        clock: seconds since the epoch. Every process sharing the file must use the same clock.
        inline: run statements that cannot wait (a read, a write that finds the database unlocked) on the
            calling thread, and hand only those that would wait to the store's thread. ``False`` runs every
            statement on the store's thread. Ignored (always ``False``) with ``synchronous`` FULL or EXTRA.
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
        self._inline_writes = 0
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
                    self._pid = pid
        assert self._executor is not None
        return self._executor

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _call(self, operation: Callable[..., T], *args: Any) -> T:
        try:
            return operation(self._connection(), *args)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    async def _run(self, operation: Callable[..., T], *args: Any, inline: bool = True) -> T:
        executor = self._executor_for_this_process()
        conn = self._inline_conn if inline else None
        # One connection runs one transaction at a time: if another thread (another event loop) is using it,
        # let the store's thread, which runs one operation at a time, take this one.
        if conn is not None and self._inline_lock.acquire(blocking=False):
            try:
                result = operation(conn, *args)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise self._error(exc) from exc
                # Another connection holds the lock: wait for it on the store's thread, not here.
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            else:
                self._inline_writes += 1
                if self._inline_writes >= _CHECKPOINT_EVERY:
                    self._inline_writes = 0
                    executor.submit(self._call, _checkpoint).add_done_callback(_log_failure)
                return result
            finally:
                self._inline_lock.release()
        result = await asyncio.get_running_loop().run_in_executor(executor, self._call, operation, *args)
        if self._inline and self._inline_conn is None and self._conn is not None:
            # The store's thread has made the schema; now the loop's own connection can be opened.
            try:
                self._inline_conn = self._connect_inline()
            except sqlite3.Error as exc:
                # Only an optimisation, and *operation* has already taken effect: never report it as failed.
                logger.warning("idempo: SQLite store %r stays on its thread: %s", self._path, exc)
        return result

    def _connect_inline(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- the Store protocol ---------------------------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return await self._run(self._claim, key, fingerprint, lease, ttl)

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

    def __init__(self, pid: int, size: int | None) -> None:
        self.pid = pid
        self.size = size  # the most connections open at once; None for no limit
        self.opened = 0
        self.idle: list[sqlite3.Connection] = []
        self.ready = threading.Condition(threading.Lock())
        self.closed = False


class SyncSQLiteStore(_SQLiteBase):
    """Records in a SQLite file, for sync callers: the blocking twin of :class:`SQLiteStore` (``store.sync()``),
    running the same statements on the same table, so the two see each other's records.

    Safe to share between threads: each operation runs on the calling thread over a connection no other thread is
    using at the time (connections are pooled; a pool holds at most as many as ran at once). Threads wait for each
    other only where SQLite makes them, a writer for the write lock, for at most *busy_timeout*. For ``":memory:"``
    the store has a single connection (each one would be a database of its own), and threads take turns on it.
    After a ``fork`` the child opens connections of its own.

    Args:
        path: the database file (created if missing; its directory must exist), or ``":memory:"``.
        table: the table's name; created on first use.
        busy_timeout: seconds an operation waits for a lock before the store reports an error.
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
        self._pool = _Pool(-1, None)

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
                    pool = self._pool = _Pool(pid, 1 if self._path == ":memory:" else None)
        return pool

    def _checkout(self) -> tuple[_Pool, sqlite3.Connection]:
        pool = self._pool_of_this_process()
        with pool.ready:
            size = pool.size
            if size is not None and not pool.ready.wait_for(
                lambda: pool.idle or pool.opened < size, timeout=self._busy_timeout
            ):
                msg = f"SQLite store {self._path!r}: its connection stayed busy for {self._busy_timeout} s"
                raise StoreError(msg)
            if pool.idle:
                return pool, pool.idle.pop()
            pool.opened += 1
        try:
            return pool, self._connect()
        except BaseException as exc:
            with pool.ready:
                pool.opened -= 1
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from exc
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
        pool, conn = self._checkout()
        try:
            return operation(conn, *args)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            self._checkin(pool, conn)

    # -- the SyncStore protocol -----------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return self._run(self._claim, key, fingerprint, lease, ttl)

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
                self._pool = _Pool(-1, None)
        with pool.ready:
            pool.closed = True
            idle, pool.idle = pool.idle, []
            pool.opened -= len(idle)
        for conn in idle:
            conn.close()
