"""``postgresql://`` and ``postgres://``: records in a PostgreSQL table, on asyncpg (the async store) and psycopg 3
(its sync twin), each with a connection pool.

Theory of operation. Every operation is one SQL statement, sent on an autocommit connection of the store's pool as a
prepared statement: one round trip, one transaction, atomic. The async store runs on asyncpg, in a pool of its own
(``._postgres_pool``, which behaves as psycopg_pool's), because asyncpg costs half the CPU time per statement that
psycopg's ``AsyncConnection`` does (``._postgres_asyncpg``); the sync store on psycopg and psycopg_pool's
``ConnectionPool``. Both run the same SQL, written once (``._postgres_sql``) with named parameters, and turned into
asyncpg's positional ones.

Clock. Times are ``double precision`` seconds since the epoch, as in :class:`~idempo.Record`, and *now* is the
database server's clock, read by each statement (``extract(epoch FROM statement_timestamp())``, the moment the
server received it): every replica of the service, whatever its own clock, agrees on when a lease or a record runs
out. (``statement_timestamp()`` rather than ``clock_timestamp()``: it is stable within a statement, so that
``expires_at <= now`` is an index condition, and ``purge_expired`` reads only the expired part of the index.)

Claim. One statement, in three parts: ``live`` reads the record if it is live (not expired, and completed or
within its lease); only if there is none, ``taken`` inserts the new claim with ``INSERT ... ON CONFLICT (key)
DO UPDATE ... WHERE <the record there is expired or stale>``; the statement returns the claim it made or the
live record it read. A replay is therefore a plain read: it takes no row lock and writes nothing. Under READ
COMMITTED, ``live`` reads the statement's snapshot, while ``ON CONFLICT`` looks at (and waits for) the newest
committed row: when another claim commits the key between the two, the statement neither takes the key nor
sees a live record, and it is simply run again, with a fresh snapshot that sees the winner's record.

Fencing. ``renew``, ``complete`` and ``release`` are ``UPDATE``/``DELETE ... WHERE key = ? AND token = ? AND
state = in progress AND expires_at > now``: they touch the row only if the caller still owns it.

Failures. Each part is bounded: ``connect_timeout`` for a new connection, ``pool_timeout`` to get one from the
pool, ``statement_timeout`` (a server setting of every connection) for a statement on the server; and if the server
does not answer at all (frozen, or cut off by the network), the client shuts the connection down one second after
that. Every failure is a :class:`~idempo.StoreError` with the client's exception as ``__cause__`` (asyncpg's or
psycopg's). A connection the server closed (a restart, ``pg_terminate_backend``) is noticed before it is used: an
idle connection has nothing to read, so when its socket is readable (or asyncpg already knows it closed), the store
checks it with a query and, if it is dead, throws it away and takes another, at no cost to healthy connections (no
round trip). The pool replaces broken connections
in the background, so the store recovers when the server is back, without a restart.

Forks. A process forked from one whose store had opened its pool (``gunicorn --preload``, where the start-up check
runs in the master) must not use the parent's connections: two processes on one socket interleave their messages
(``DuplicatePreparedStatement``, answers read by the wrong process). The child opens a pool of its own on first
use; the pool it inherited is kept, never used nor closed (closing would tell the server to end the parent's
sessions, or take the parent's sockets out of the epoll set both share), for as long as the child lives.

Sync. :class:`SyncPostgresStore` is the blocking twin, on psycopg's ``Connection`` and ``ConnectionPool``. Each
operation is written once, as a plan (see :mod:`idempo._core.plans` and ``._postgres_operations``) that yields the
statements to run (the same SQL) and receives their results, and so is the look for a live connection of the pool;
the async store performs their effects with ``await`` on asyncpg, the sync one with blocking calls, so the claim's
retry, the fencing, the paging of a scan, the dead connections and the table creation are the same code in both.
Where the async store's deadline is one timer of its event loop for every statement in flight, the sync store's is a
watchdog thread, which shuts the socket down just the same (``._postgres_deadlines``). What each store keeps of its
own is how it opens its pool once for every caller: a shared task of the event loop, or a lock. One shortcut: where
a connection of its pool is free and has nothing to read (nearly always), the async store makes the statement of a
``claim`` or a ``complete`` itself, outside the plan (whose parameters, effect and driving cost a tenth of the call's
CPU time), and reads its answer with the plan's own functions (``claim_of``, ``owned``); the plan does the rest.

The table (created on first use, with an index on ``expires_at`` for ``purge_expired``)::

    key text PRIMARY KEY, state smallint (0 in progress, 1 completed), fingerprint text, token text,
    created_at, lease_expires_at, expires_at double precision (seconds since the epoch), payload bytea
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from typing import Any, TypeVar

from .._core.errors import StoreError
from .._core.plans import iterate, iterate_async, run, run_async
from .._core.records import Claim, Record, new_token
from . import require

# Imported after the check, so that a missing extra says what to install.
require("psycopg", extra="postgres")
require("psycopg_pool", extra="postgres")
require("asyncpg", extra="postgres")

import psycopg  # noqa: E402
from psycopg.rows import TupleRow  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402

from ._postgres_asyncpg import FAILURES as _FAILURES  # noqa: E402
from ._postgres_asyncpg import asyncpg_dsn, connect, count_of, disown, has_input, kill  # noqa: E402
from ._postgres_deadlines import Deadline, Deadlines, watchdog  # noqa: E402
from ._postgres_deadlines import has_input as has_input_sync  # noqa: E402
from ._postgres_operations import (  # noqa: E402
    ALL,
    CLAIM_ATTEMPTS,
    FAILURES,
    FIRST,
    Drop,
    PostgresOperations,
    Probe,
    Step,
    Take,
    claim_of,
    owned,
    strip_options,
)
from ._postgres_pool import Pool, Pooled  # noqa: E402

__all__ = ["PostgresStore", "SyncPostgresStore"]

_strip_options = strip_options  # the benchmark's name for it
_T = TypeVar("_T")

_SyncConnection = psycopg.Connection[TupleRow]

_MAX_LIFETIME = 3600.0  # seconds a connection of the async store's pool is kept, less up to 5% (as psycopg_pool's)

# Pools a forked child inherited from its parent: their connections are the parent's sessions, so the child never
# uses them, and never closes them either (that would end the parent's sessions on the server).
_INHERITED_POOLS: list[object] = []
# Every store, told when the process forks.
_STORES: weakref.WeakSet[PostgresStore | SyncPostgresStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forked()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PostgresStore(PostgresOperations):
    """Records in a PostgreSQL table: one statement per operation, shared by every process and machine.

    The pool opens lazily, on first use, inside the running event loop: a store may be created at import time.
    Use one store per event loop (a pool belongs to the loop that opened it) and :meth:`close` it at shutdown.
    Call :meth:`purge_expired` from time to time (e.g. from a scheduled job): PostgreSQL does not drop expired
    rows on its own, although the store never shows them. :meth:`sync` gives its blocking twin.

    Args:
        conninfo: a libpq connection string or URL, e.g. ``"postgresql://app:secret@db.internal/app"`` or
            ``"host=db dbname=app"``. libpq's environment variables (``PGHOST``, ``PGPASSWORD``...) apply. The
            async store connects with asyncpg, which takes libpq's parameters but a few (``gssencmode=require``,
            ``requirepeer``...: a :class:`~idempo.ConfigurationError`; TCP's tuning, e.g. ``keepalives``, is ignored).
        table: the table's name (letters, digits and underscores, at most 48); created on first use, with an
            index ``<table>_expires_at``.
        min_size: connections the pool keeps open.
        max_size: connections the pool may open; more concurrent operations wait for one.
        connect_timeout: seconds to open a connection (whole seconds, at least 2, as libpq counts them).
        statement_timeout: seconds a statement may run on the server (the server setting ``statement_timeout`` of
            every connection), e.g. while it waits for a row lock.
        pool_timeout: seconds an operation waits for a connection of the pool, e.g. while the server is down.
        reconnect_timeout: seconds the pool keeps retrying a connection that fails before giving up on it (the
            next operation starts a new attempt); a short one means a quick recovery once the server is back.
        application_name: the ``application_name`` the server shows for the store's connections; by default the
            one in *conninfo*, else ``"idempo"``.
        prepare: use prepared statements (one round trip per operation). Turn it off behind a connection
            pooler that does not support them (PgBouncer before 1.21 in transaction mode); then the async store
            takes two round trips per operation (asyncpg describes each statement before it runs it).
        clock: for tests only: seconds since the epoch, instead of the server's clock.
    """

    def _set_up_runner(self) -> None:
        self._dsn = asyncpg_dsn(self._conninfo_params, self._display)
        self._server_settings = {
            "application_name": self._application_name,
            "statement_timeout": str(int(self._statement_timeout * 1000)),
        }
        # The two statements claim and complete make outside their plans, with their arguments in this order.
        self._claim_sql = self._sql.in_order(self._sql.claim, ("now", "key", "fingerprint", "token", "lease", "ttl"))
        self._complete_sql = self._sql.in_order(self._sql.complete, ("payload", "ttl", "now", "key", "token"))
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Deadlines | None = None  # of the pool's loop
        self._opening: asyncio.Task[Pool] | None = None
        self._sync_twin: SyncPostgresStore | None = None
        _STORES.add(self)

    def _forked(self) -> None:
        # In a forked child: the parent's pool (and its event loop's task) are not ours. The sync twin is told too.
        if self._pool is not None:
            disown(self._pool)
            _INHERITED_POOLS.append(self._pool)
        self._pool, self._loop, self._opening, self._deadlines = None, None, None, None

    def sync(self) -> SyncPostgresStore:
        """The blocking twin of this store (for the decorator on sync functions): a :class:`SyncPostgresStore`
        on the same server and table, with the same options, and a pool of its own. Always the same one;
        :meth:`close` closes it too."""
        if self._closed:
            raise self._closed_error()
        if self._sync_twin is None:
            self._sync_twin = SyncPostgresStore(self._conninfo, **self._options)
        return self._sync_twin

    # -- the pool -------------------------------------------------------------------------------------------

    async def _connect(self) -> Pooled:
        return await connect(
            self._dsn,
            connect_timeout=self._connect_timeout,
            server_settings=self._server_settings,
            prepare=self._prepare,
            lifetime=_MAX_LIFETIME * random.uniform(0.95, 1.0),
        )

    async def _open(self) -> Pool:
        """The pool, opened (and the table made) on first use.

        Operations that arrive while it opens wait for that one attempt, and share its failure: each waits for
        one connection attempt at most, never for a queue of them."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise self._closed_error()
        if self._pool is not None:
            if self._loop is not loop:
                msg = f"PostgreSQL store {self._display!r} was opened in another event loop: use one per loop"
                raise StoreError(msg)
            return self._pool
        opening = self._opening
        if opening is None or opening.done() or opening.get_loop() is not loop:
            opening = self._opening = loop.create_task(self._start())
        # Shielded: an operation cancelled while it waits must not cancel the others' attempt.
        return await asyncio.shield(opening)

    async def _start(self) -> Pool:
        loop = asyncio.get_running_loop()
        deadline = None
        try:
            # A connection of its own first, so that a wrong password or database name comes out as such, not as a
            # pool timeout; it then joins the pool.
            first = await self._connect()
            try:
                # A few statements, one of which may wait for another process's lock (statement_timeout).
                with Deadline(first, self._answer_timeout * 3, kill) as deadline:
                    async with first.conn.transaction():
                        await run_async(
                            self._create_table_plan(), lambda step: _run(first.conn, step, self._sql.positional)
                        )
            except BaseException:
                first.conn.terminate()
                raise
        except _FAILURES as exc:
            no_answer = deadline is not None and deadline.expired
            raise self._error(exc, "creating the table", no_answer=no_answer) from exc
        if self._closed:  # while this was opening
            first.conn.terminate()
            raise self._closed_error()
        pool = Pool(
            self._connect,
            failures=_FAILURES,
            min_size=self._min_size,
            max_size=self._max_size,
            reconnect_timeout=self._reconnect_timeout,
        )
        pool.open(first)
        self._deadlines = Deadlines(loop, self._answer_timeout, kill)
        self._pool, self._loop = pool, loop
        return pool

    # -- performing the plans' effects, awaited ---------------------------------------------------------------

    def _has_input(self, conn: Any) -> bool:
        return has_input(conn)

    async def _perform_on_pool(self, pool: Pool, effect: Take | Probe | Drop) -> Any:
        if isinstance(effect, Take):
            return await pool.getconn(effect.timeout)
        if isinstance(effect, Probe):
            # Reads what is there first: a notice, or the server's goodbye (then the connection is closed).
            with Deadline(effect.conn, self._answer_timeout, kill):
                try:
                    await effect.conn.conn.execute("SELECT 1")
                except _FAILURES:
                    return False
            return True
        pool.putconn(effect.conn)
        return None

    def _ready(self) -> tuple[Pool, Pooled] | None:
        """The pool open in this loop and a free connection of it with nothing to read, taken: the common case, at no
        more cost than that. ``None`` otherwise (the pool to open, no free connection, or one to look at first), for
        :meth:`_perform` to find a live connection as the plan says."""
        pool = self._pool
        if pool is None or self._loop is not asyncio.get_running_loop():
            return None
        free = pool.free_connection()
        if free is None:
            return None
        if has_input(free):
            pool.putconn(free)  # for the plan to look at it first
            return None
        return pool, free

    async def _perform(self, step: Step) -> Any:
        """Run *step* on a live connection of the pool: its row count and first row, or all its rows."""
        try:
            ready = self._ready()
            if ready is None:
                opened = self._pool
                pool = await self._open() if opened is None or self._loop is not asyncio.get_running_loop() else opened
                plan = self._live_connection_plan()
                ready = pool, await run_async(plan, lambda effect: self._perform_on_pool(pool, effect))
        except StoreError:
            raise
        except _FAILURES as exc:
            raise self._error(exc, step.doing) from exc
        return await self._on(ready, step.doing, _run, step, self._sql.positional)

    async def _on(
        self, ready: tuple[Pool, Pooled], doing: str, statement: Callable[..., Awaitable[_T]], *args: Any
    ) -> _T:
        """``statement(connection, *args)`` on the live connection of the pool in *ready*, bounded by the loop's
        deadlines and given back after; a failure is a :class:`~idempo.StoreError` saying what it was *doing*.
        Every statement of the store's operations runs here: a plan's step (:meth:`_perform`), and the statement a
        claim or a completion makes outside its plan (a plan's statement costs its parameters, its effect and their
        driving: measured, a tenth of a store call's CPU time)."""
        pool, pooled = ready
        deadlines = self._deadlines
        assert deadlines is not None  # set with the pool
        guard = deadlines.start(pooled)
        try:
            return await statement(pooled.conn, *args)
        except _FAILURES as exc:
            raise self._error(exc, doing, no_answer=guard.expired) from exc
        finally:
            deadlines.finish(guard)
            pool.putconn(pooled)

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        token = token or new_token()
        attempts = CLAIM_ATTEMPTS
        ready = self._ready()
        if ready is not None:  # the first attempt, here; the plan makes the others, if any
            args = (self._now(), key, fingerprint, token, float(lease), float(ttl))
            claim = claim_of(await self._on(ready, "claim", _fetchrow, self._claim_sql, args), token)
            if claim is not None:
                return claim
            attempts -= 1
        return await run_async(self._claim_plan(key, fingerprint, lease, ttl, token, attempts), self._perform)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return await run_async(self._renew_plan(key, token, lease), self._perform)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        ready = self._ready()
        if ready is not None:  # as the plan would, without it
            args = (payload, float(ttl), self._now(), key, token)
            return owned(count_of(await self._on(ready, "complete", _execute, self._complete_sql, args)))
        return await run_async(self._complete_plan(key, token, payload, ttl), self._perform)

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return await run_async(self._release_plan(key, token), self._perform)

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return await run_async(self._get_plan(key), self._perform)

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return await run_async(self._delete_plan(key), self._perform)

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Deletes in batches of 10,000 rows, one statement each, and
        skips rows another session holds locked at that moment (they are left for the next purge)."""
        return await run_async(self._purge_plan(), self._perform)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order (the table's collation), reading
        pages of 100 records, one statement each: ``WHERE key > <last key> AND key LIKE <prefix>% ORDER BY key``.
        (A ``LIKE`` under a collation other than ``C`` cannot narrow the index scan: a prefix matching few of
        many records walks the index.)"""
        return iterate_async(self._scan_plan(prefix, limit), Record, self._perform)

    async def close(self) -> None:
        """Close the pool and its connections, and those of the :meth:`sync` twin. The store is not used
        afterwards."""
        self._closed = True
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            with suppress(StoreError):
                await opening  # bounded by connect_timeout and statement_timeout; closes its connection itself
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        twin, self._sync_twin = self._sync_twin, None
        if twin is not None:
            await asyncio.to_thread(twin.close)


def _fetchrow(conn: Any, sql: str, args: tuple[Any, ...]) -> Awaitable[Any]:
    """The first row of *sql* (positional) with *args* on an asyncpg connection, or ``None``."""
    return conn.fetchrow(sql, *args)  # type: ignore[no-any-return]


def _execute(conn: Any, sql: str, args: tuple[Any, ...]) -> Awaitable[str]:
    """The status of *sql* (positional) with *args* on an asyncpg connection (``UPDATE 1``)."""
    return conn.execute(sql, *args)  # type: ignore[no-any-return]


async def _run(conn: Any, step: Step, positional: dict[bytes, tuple[str, tuple[str, ...]]]) -> Any:
    """Run *step* on an asyncpg connection, in the positional style of its statement (*positional*, by the named
    one): its row count and first row, or all its rows."""
    sql, names = positional[step.query]
    params = step.params
    args = [params[name] for name in names] if params else ()
    if step.rows == FIRST:
        row = await conn.fetchrow(sql, *args)
        return (0 if row is None else 1), row
    if step.rows == ALL:
        return await conn.fetch(sql, *args)
    return count_of(await conn.execute(sql, *args)), None


class SyncPostgresStore(PostgresOperations):
    """The blocking twin of :class:`PostgresStore`, for sync callers: the same table, SQL and operations, on
    psycopg's blocking connections and ``psycopg_pool.ConnectionPool``. Safe to share between threads (each
    operation takes a connection of the pool); no event loop anywhere.

    The pool opens lazily, on first use, in whichever thread comes first; :meth:`close` it at shutdown.
    ``PostgresStore.sync()`` builds one alike.

    Failures are bounded as in :class:`PostgresStore`: ``connect_timeout``, ``pool_timeout``,
    ``statement_timeout``, and a server that does not answer at all (frozen, or cut off by the network) is given
    one second past ``statement_timeout``, after which a watchdog thread (one for all sync stores) shuts the
    connection's socket down and the blocked call fails with a :class:`~idempo.StoreError`.

    Args: as for :class:`PostgresStore`.
    """

    def _set_up_runner(self) -> None:
        self._pool: ConnectionPool[_SyncConnection] | None = None
        self._lock = threading.Lock()  # one thread opens the pool; the others wait for it
        self._finished = 0
        self._failure: StoreError | None = None
        _STORES.add(self)

    def _forked(self) -> None:
        # In a forked child: the parent's pool is not ours, and a lock another of its threads held is never released.
        if self._pool is not None:
            _INHERITED_POOLS.append(self._pool)
        self._pool, self._lock, self._finished, self._failure = None, threading.Lock(), 0, None

    # -- the pool -------------------------------------------------------------------------------------------

    def _configure(self, conn: _SyncConnection) -> None:
        with watchdog.deadline(conn, self._answer_timeout):
            conn.execute(self._set_timeout)

    def _open(self) -> ConnectionPool[_SyncConnection]:
        """The pool, opened (and the table made) on first use.

        Threads that arrive while another opens it wait for that one attempt and share its failure: each waits
        for one connection attempt at most, never for a queue of them."""
        finished = self._finished  # attempts finished before this thread arrived
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._pool is not None:
                return self._pool
            failure = self._failure
            if failure is not None and self._finished != finished:  # the attempt this thread waited for failed
                raise StoreError(str(failure)) from failure.__cause__
            try:
                pool = self._start()
            except StoreError as exc:
                self._failure = exc
                raise
            finally:
                self._finished += 1
            self._failure = None
            self._pool = pool
            return pool

    def _start(self) -> ConnectionPool[_SyncConnection]:
        guard = None
        try:
            # On a connection of its own, so that a wrong password or database name comes out as such,
            # not as a pool timeout.
            with psycopg.Connection.connect(self._conninfo, **self._connect_kwargs()) as conn:
                self._configure(conn)
                # A few statements, one of which may wait for another process's lock (statement_timeout).
                with watchdog.deadline(conn, self._answer_timeout * 3) as guard, conn.transaction():
                    run(self._create_table_plan(), lambda step: self._execute_on(conn, step))
        except FAILURES as exc:
            raise self._error(exc, "creating the table", no_answer=guard is not None and guard.expired) from exc
        pool: ConnectionPool[_SyncConnection] = ConnectionPool(
            self._conninfo, configure=self._configure, **self._pool_options()
        )
        pool.open(wait=False)
        return pool

    # -- performing the plans' effects, blocking --------------------------------------------------------------

    @staticmethod
    def _execute_on(conn: _SyncConnection, step: Step) -> tuple[int, TupleRow | None]:
        cursor = conn.execute(step.query, step.params)
        return cursor.rowcount, cursor.fetchone() if step.rows == FIRST else None

    def _has_input(self, conn: Any) -> bool:
        return has_input_sync(conn)

    def _perform_on_pool(self, pool: ConnectionPool[_SyncConnection], effect: Take | Probe | Drop) -> Any:
        if isinstance(effect, Take):
            return pool.getconn(timeout=effect.timeout)
        if isinstance(effect, Probe):
            with watchdog.deadline(effect.conn, self._answer_timeout):
                try:
                    effect.conn.execute(b"")  # reads what is there: a notice, or the server's goodbye
                except psycopg.Error:
                    return False
            return True
        pool.putconn(effect.conn)
        return None

    def _perform(self, step: Step) -> Any:
        """Run *step* on a live connection of the pool: its row count and first row, or all its rows."""
        guard = None
        try:
            pool = self._pool
            if pool is None:
                pool = self._open()
            conn = run(self._live_connection_plan(), lambda effect: self._perform_on_pool(pool, effect))
            try:
                with watchdog.deadline(conn, self._answer_timeout) as guard:
                    cursor = conn.execute(step.query, step.params, prepare=self._prepare, binary=True)
                    if step.rows == ALL:
                        return cursor.fetchall()
                    return cursor.rowcount, cursor.fetchone() if step.rows == FIRST else None
            finally:
                pool.putconn(conn)
        except StoreError:
            raise
        except FAILURES as exc:
            raise self._error(exc, step.doing, no_answer=guard is not None and guard.expired) from exc

    # -- the SyncStore protocol -----------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return run(self._claim_plan(key, fingerprint, lease, ttl, token), self._perform)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return run(self._renew_plan(key, token, lease), self._perform)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return run(self._complete_plan(key, token, payload, ttl), self._perform)

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return run(self._release_plan(key, token), self._perform)

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return run(self._get_plan(key), self._perform)

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return run(self._delete_plan(key), self._perform)

    def purge_expired(self) -> int:
        """See :meth:`PostgresStore.purge_expired`."""
        return run(self._purge_plan(), self._perform)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`PostgresStore.scan`."""
        return iterate(self._scan_plan(prefix, limit), Record, self._perform)

    def close(self) -> None:
        """Close the pool and its connections. The store is not used afterwards."""
        self._closed = True
        with self._lock:  # waits for an opening in progress (bounded by connect_timeout and statement_timeout)
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
