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
without being run. Each store checkpoints every 1000 operations that write, so that the WAL stays bounded under
sustained load; connections, checkpoints and forks are ``._sqlite_connections``'s.

Written once. Each operation is a plain function of a connection (its statements, in one attempt that never
yields: a transaction that holds the write lock must not wait for anything), and how it is tried again until its
deadline is a plan (see :mod:`idempo._core.plans`) that yields each attempt and each pause. The two stores differ
only in how they perform them: :class:`SQLiteStore` awaits its pauses and runs an attempt on the loop's connection
or on its thread; :class:`SyncSQLiteStore`, the blocking twin (``SQLiteStore.sync()``, ``sync_store_from_url``),
sleeps, and runs an attempt on the caller's thread over a pooled connection that no other thread is using.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Self, TypeVar

from .._core.plans import iterate, iterate_async, run, run_async
from .._core.records import Claim, Record
from ._sqlite_connections import PROCESS, Busy, Pool, StoreThread, fork_lock, inherit, run_operation
from ._sqlite_operations import Attempt, Pause, SQLiteOperations
from ._url import StoreURL

__all__ = ["SQLiteStore", "SyncSQLiteStore"]

T = TypeVar("T")


class SQLiteStore(SQLiteOperations):
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
        # Not for ":memory:": each connection to it is a database of its own, the loop's would have no table.
        self._inline = inline and self._synchronous in ("OFF", "NORMAL") and self._path != ":memory:"
        self._thread = StoreThread(self._database, -1, self._inline)  # started on first use, in each process
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

    # -- performing the plans: on the loop's connection, or on the store's thread ---------------------------

    def _thread_of_this_process(self) -> StoreThread:
        thread, pid = self._thread, PROCESS.pid
        if thread.pid != pid:  # first use, or we are a forked child: the parent's thread and connections are not ours
            with self._lock:
                thread = self._thread
                if thread.pid != pid:
                    thread.inherit()
                    thread = self._thread = StoreThread(self._database, pid, self._inline)
        return thread

    async def _run(self, operation: Callable[..., T], args: tuple[Any, ...], inline: bool = True) -> T:
        # The first attempt is made here, outside the plan: most operations end with it, and driving a plan costs
        # a generator and its runner (measured: a microsecond, a tenth of a replay's store call). What follows a
        # busy attempt is the plan's, until busy_timeout after the call.
        thread = self._thread
        checkpoints = thread.checkpoints
        conn = thread.inline_conn if inline and thread.pid == PROCESS.pid and not checkpoints.closed else None
        if conn is not None and thread.inline_lock.acquire(False):
            # On the loop's connection, free and open in this process (nearly always): the attempt is made right
            # here, as _try would make it, without its coroutine.
            try:
                try:
                    result: T
                    result, wrote = run_operation(conn, operation, args)
                finally:
                    thread.inline_lock.release()
            except sqlite3.Error as exc:
                failure = self._database.failure(exc)
                if not isinstance(failure, Busy):
                    raise failure from exc
                # The deadline counts from here, microseconds after the call: this attempt did not wait.
                attempt = Attempt(operation, args, time.monotonic() + self._busy_timeout, inline)
                return await run_async(self._attempts(attempt, failure), self._perform)
            if wrote and checkpoints.due():
                executor = thread.executor
                assert executor is not None
                executor.submit(thread.checkpoint)
            return result
        deadline = time.monotonic() + self._busy_timeout
        try:
            result = await self._try(operation, args, deadline, inline)
        except Busy as busy:
            result = await run_async(self._attempts(Attempt(operation, args, deadline, inline), busy), self._perform)
        return result

    async def _perform(self, effect: Attempt | Pause) -> Any:
        if isinstance(effect, Pause):
            await asyncio.sleep(effect)
            return None
        return await self._try(*effect)

    async def _try(self, operation: Callable[..., T], args: tuple[Any, ...], deadline: float, inline: bool) -> T:
        """Make an attempt (see :class:`Attempt`): on the loop's connection if it may, else on the store's thread."""
        thread = self._thread_of_this_process()
        checkpoints = thread.checkpoints
        # While a checkpoint restarts the WAL, operations queue on the thread behind it.
        conn = thread.inline_conn if inline and not checkpoints.closed else None
        # One connection runs one transaction at a time: if another thread (another event loop) is using it, let
        # the store's thread, which runs one operation at a time, take this one.
        if conn is not None and thread.inline_lock.acquire(blocking=False):
            try:
                result, wrote = run_operation(conn, operation, args)
            except sqlite3.Error as exc:
                raise self._database.failure(exc) from exc
            finally:
                thread.inline_lock.release()
        else:
            bound = deadline if self._busy_timeout else None
            executor = thread.executor
            assert executor is not None
            result, wrote = await asyncio.get_running_loop().run_in_executor(
                executor, thread.on_thread, bound, operation, args
            )
            thread.open_inline()
        if wrote and checkpoints.due():
            executor = thread.executor
            assert executor is not None
            executor.submit(thread.checkpoint)
        return result

    # -- the Store protocol ---------------------------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return await self._run(self._claim, (key, fingerprint, lease, ttl, token))

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return await self._run(self._renew, (key, token, lease))

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return await self._run(self._complete, (key, token, payload, ttl))

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return await self._run(self._release, (key, token))

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return await self._run(self._get, (key,))

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return await self._run(self._delete, (key,))

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Always on the store's thread: it may delete many rows. In
        batches of keys, each a short write transaction of its own."""
        return await run_async(self._purge_plan(), self._perform)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order, reading pages of 100 records, one
        statement each."""
        return iterate_async(self._scan_plan(prefix, limit), Record, self._perform)

    async def close(self) -> None:
        """Close the connections and stop the store's thread (and close the twin :meth:`sync` returned)."""
        twin = self._sync_twin
        if twin is not None:
            await asyncio.to_thread(twin.close)  # closing the last connection to a file may checkpoint
        thread = self._thread
        if thread.pid != PROCESS.pid or thread.executor is None:
            return
        if thread.inline_conn is not None:
            thread.inline_conn.close()
            thread.inline_conn = None
        await asyncio.get_running_loop().run_in_executor(thread.executor, thread.close_connection)
        thread.executor.shutdown(wait=False)
        self._thread = StoreThread(self._database, -1, self._inline)


class SyncSQLiteStore(SQLiteOperations):
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
        self._pool = Pool(self._database, -1)  # started on first use, in each process

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

    # -- performing the plans: on the caller's thread, over a connection of the pool ------------------------

    def _pool_of_this_process(self) -> Pool:
        pool, pid = self._pool, PROCESS.pid
        if pool.pid != pid:  # first use, or we are a forked child: the parent's connections are not ours
            with fork_lock():
                pool = self._pool
                if pool.pid != pid:
                    if pool.pid != -1:
                        inherit(pool.idle)  # not under pool.ready: a thread of the parent may have held it
                    pool = self._pool = Pool(self._database, pid)
        return pool

    def _run(self, operation: Callable[..., T], args: tuple[Any, ...]) -> T:
        deadline = time.monotonic() + self._busy_timeout  # the first attempt outside the plan, as in SQLiteStore._run
        try:
            result: T = self._try(operation, args, deadline)
        except Busy as busy:
            result = run(self._attempts(Attempt(operation, args, deadline, True), busy), self._perform)
        return result

    def _perform(self, effect: Attempt | Pause) -> Any:
        if isinstance(effect, Pause):
            time.sleep(effect)
            return None
        return self._try(effect.operation, effect.args, effect.deadline)

    def _try(self, operation: Callable[..., T], args: tuple[Any, ...], deadline: float) -> T:
        """Make an attempt (see :class:`Attempt`) on a connection of the pool."""
        pool = self._pool_of_this_process()
        conn = pool.checkout(deadline)
        try:
            try:
                result, wrote = run_operation(conn, operation, args)
            except sqlite3.Error as exc:
                raise self._database.failure(exc) from exc
            # A write that makes a checkpoint due: this thread checkpoints, as SQLite's own automatic checkpoint would.
            if wrote and pool.checkpoints.due():
                pool.checkpoints.run(conn)
            return result
        finally:
            pool.checkin(conn)

    # -- the SyncStore protocol -----------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return self._run(self._claim, (key, fingerprint, lease, ttl, token))

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return self._run(self._renew, (key, token, lease))

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return self._run(self._complete, (key, token, payload, ttl))

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return self._run(self._release, (key, token))

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return self._run(self._get, (key,))

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return self._run(self._delete, (key,))

    def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. In batches of keys, each a short write transaction of its own."""
        return run(self._purge_plan(), self._perform)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order, reading pages of 100 records, one
        statement each."""
        return iterate(self._scan_plan(prefix, limit), Record, self._perform)

    def close(self) -> None:
        """Close the connections (one still in use is closed when its operation ends). Using the store again
        opens new ones."""
        pool = self._pool_of_this_process()
        with fork_lock():
            if self._pool is pool:
                self._pool = Pool(self._database, -1)
        pool.close()
