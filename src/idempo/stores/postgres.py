"""``postgresql://`` and ``postgres://``: records in a PostgreSQL table, on psycopg 3 and its connection pool.

Theory of operation. Every operation is one SQL statement, sent on an autocommit connection of the store's pool
(psycopg_pool's ``AsyncConnectionPool``) as a prepared statement: one round trip, one transaction, atomic.

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
pool, ``statement_timeout`` (set on every connection) for a statement on the server; and if the server does not
answer at all (frozen, or cut off by the network), the client shuts the connection down one second after that.
Every failure is a :class:`~idempo.StoreError` with psycopg's exception as ``__cause__``. A connection the
server closed (a restart, ``pg_terminate_backend``) is noticed before it is used: an idle connection has nothing
to read, so when its socket is readable, the store checks it with an empty query and, if it is dead, throws it
away and takes another, at no cost to healthy connections (no round trip). The pool replaces broken connections
in the background, so the store recovers when the server is back, without a restart.

Sync. :class:`SyncPostgresStore` is the blocking twin, on psycopg's ``Connection`` and ``ConnectionPool``. Each
operation is written once, as a *plan*: a generator that yields the statements to run (the same prepared SQL) and
receives their results; the async store runs plans with ``await``, the sync one with blocking calls, so the claim's
retry, the fencing and the table creation are the same code in both. Where the async store's deadline is a timer of
its event loop, the sync store's is a watchdog thread, which shuts the socket down just the same.

The table (created on first use, with an index on ``expires_at`` for ``purge_expired``)::

    key text PRIMARY KEY, state smallint (0 in progress, 1 completed), fingerprint text, token text,
    created_at, lease_expires_at, expires_at double precision (seconds since the epoch), payload bytea
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import re
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeVar

from .._core.errors import ConfigurationError, StoreError
from .._core.records import Acquired, Claim, Existing, Record, new_token
from . import require
from ._rows import COMPLETED, IN_PROGRESS, record_from_row
from ._scan import LIKE_ESCAPE, Page, keyset_plan, like_prefix, run_plan, run_plan_async
from ._url import StoreURL, redact

# Imported after the check, so that a missing extra says what to install.
require("psycopg", extra="postgres")
require("psycopg_pool", extra="postgres")

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402
from psycopg.rows import TupleRow  # noqa: E402
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout  # noqa: E402

__all__ = ["PostgresStore", "SyncPostgresStore"]

_Connection = psycopg.AsyncConnection[TupleRow]
_T = TypeVar("_T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
_CLAIM_ATTEMPTS = 10
_ANSWER_GRACE = 1.0  # seconds the client waits past statement_timeout for an answer before it gives up
# The store's own options in a URL's query string; everything else there is passed on to libpq.
_URL_OPTIONS: Final = frozenset(
    {
        "table",
        "min_size",
        "max_size",
        "connect_timeout",
        "statement_timeout",
        "pool_timeout",
        "reconnect_timeout",
        "prepare",
    }
)
_FALSE = ("0", "false", "no", "off")
_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)

# psycopg's errors, the pool's, and what the socket layer or a client-side timeout may raise.
_FAILURES = (psycopg.Error, PoolTimeout, OSError, TimeoutError)


# The server's clock, unless a clock was given (tests): then the parameter %(now)s. statement_timestamp(), not
# clock_timestamp(): it is STABLE, so that "expires_at <= now" can be an index condition.
_NOW = sql.SQL("COALESCE(%(now)s::float8, extract(epoch FROM statement_timestamp())::float8)")


class _Statements:
    """The store's SQL, written once per table. Plain ``bytes``, so that psycopg can prepare them as they are;
    a synchronous runner could execute the very same statements."""

    def __init__(self, table: str) -> None:
        t = sql.Identifier(table)
        cols = sql.SQL("key, state, fingerprint, token, created_at, lease_expires_at, expires_at, payload")
        fmt: dict[str, sql.Composable] = {"t": t, "cols": cols, "now": _NOW}

        def render(template: str, **extra: sql.Composable) -> bytes:
            return sql.SQL(template).format(**fmt, **extra).as_bytes(None)

        self.create = [
            render(
                "CREATE TABLE IF NOT EXISTS {t} ("
                " key text PRIMARY KEY,"
                " state smallint NOT NULL,"
                " fingerprint text NOT NULL,"
                " token text NOT NULL,"
                " created_at double precision NOT NULL,"
                " lease_expires_at double precision NOT NULL,"
                " expires_at double precision NOT NULL,"
                " payload bytea)"
            ),
            render(
                "CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at)", index=sql.Identifier(f"{table}_expires_at")
            ),
        ]
        # Both the table and its index exist: nothing to create, and no lock to take.
        self.exists = b"SELECT to_regclass(%(table)s) IS NOT NULL AND to_regclass(%(index)s) IS NOT NULL"
        self.table_name = sql.Identifier(table).as_string(None)
        self.index_name = sql.Identifier(f"{table}_expires_at").as_string(None)
        # Serialises creation across processes: concurrent CREATE ... IF NOT EXISTS may fail with a unique violation.
        self.lock = b"SELECT pg_advisory_xact_lock(hashtext('idempo:create:' || %(table)s))"
        self.claim = render(
            "WITH now AS (SELECT {now} AS t),"
            " live AS ("
            "  SELECT r.key, r.state, r.fingerprint, r.token, r.created_at, r.lease_expires_at, r.expires_at, r.payload"
            "  FROM {t} AS r, now"
            "  WHERE r.key = %(key)s AND r.expires_at > now.t"
            f"  AND (r.state = {COMPLETED} OR r.lease_expires_at > now.t)),"
            " taken AS ("
            "  INSERT INTO {t} AS r ({cols})"
            f"  SELECT %(key)s, {IN_PROGRESS}, %(fingerprint)s, %(token)s, now.t, now.t + %(lease)s, now.t + %(ttl)s,"
            "  NULL FROM now WHERE NOT EXISTS (SELECT FROM live)"
            "  ON CONFLICT (key) DO UPDATE SET"
            f"  state = {IN_PROGRESS}, fingerprint = excluded.fingerprint, token = excluded.token,"
            "  created_at = excluded.created_at, lease_expires_at = excluded.lease_expires_at,"
            "  expires_at = excluded.expires_at, payload = NULL"
            "  WHERE r.expires_at <= excluded.created_at"
            f"  OR (r.state = {IN_PROGRESS} AND r.lease_expires_at <= excluded.created_at)"
            "  RETURNING r.key, r.state, r.fingerprint, r.token, r.created_at, r.lease_expires_at, r.expires_at,"
            "  r.payload)"
            " SELECT true, taken.* FROM taken"
            " UNION ALL SELECT false, live.* FROM live"
        )
        fenced = f"key = %(key)s AND token = %(token)s AND state = {IN_PROGRESS} AND expires_at > now.t"
        self.renew = render(
            "UPDATE {t} SET lease_expires_at = now.t + %(lease)s FROM (SELECT {now} AS t) AS now WHERE " + fenced
        )
        self.complete = render(
            f"UPDATE {{t}} SET state = {COMPLETED}, token = '', payload = %(payload)s,"
            " lease_expires_at = now.t, expires_at = now.t + %(ttl)s"
            " FROM (SELECT {now} AS t) AS now WHERE " + fenced
        )
        self.release = render("DELETE FROM {t} USING (SELECT {now} AS t) AS now WHERE " + fenced)
        self.get = render("SELECT {cols} FROM {t} WHERE key = %(key)s AND expires_at > {now}")
        self.delete = render("DELETE FROM {t} WHERE key = %(key)s")
        # In batches, so that a purge of millions of rows never runs into statement_timeout nor holds their
        # locks for long; SKIP LOCKED: a purge never waits for a claim (or another purge) that holds a row.
        self.purge = render(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE expires_at <= {now}"
            " LIMIT %(batch)s FOR UPDATE SKIP LOCKED))"
        )
        # Keyset pagination along the primary key's index: each page starts after the last key of the one
        # before, in the table's collation (ORDER BY and > agree on it, so no record is listed twice).
        like = f"key LIKE %(pattern)s ESCAPE '{LIKE_ESCAPE}' AND expires_at > {{now}}"
        self.scan_first = render("SELECT {cols} FROM {t} WHERE " + like + " ORDER BY key LIMIT %(size)s")
        self.scan_next = render(
            "SELECT {cols} FROM {t} WHERE key > %(after)s AND " + like + " ORDER BY key LIMIT %(size)s"
        )


_PURGE_BATCH = 10_000
_SCAN_PAGE = 100  # records per statement of a scan (payloads included: each may be large)


def _display(conninfo: str) -> str:
    """*conninfo* without its password, for messages and reprs."""
    if "://" in conninfo:
        return redact(conninfo)
    return _PASSWORD_PARAM.sub(r"\1***", conninfo)


def _strip_options(url: StoreURL) -> str:
    """The libpq URL of *url*: the store's own options removed from the query string, the rest kept as written."""
    base, _, rest = url.raw.partition("?")
    base = url.scheme + base[base.index("://") :]  # libpq wants the scheme in lower case
    query = rest.partition("#")[0]
    kept = [part for part in query.split("&") if part and part.partition("=")[0] not in _URL_OPTIONS]
    return f"{base}?{'&'.join(kept)}" if kept else base


def _has_input(conn: psycopg.BaseConnection[Any]) -> bool:
    """Whether an idle connection's socket is readable: the server closed it (or sent a notice). No round trip."""
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - Windows
    return bool(readable)


def _shut_down(conn: psycopg.BaseConnection[Any]) -> None:
    """Shut *conn*'s socket down: a read or write pending on it fails at once, and the connection is broken."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return  # already closed
    with suppress(OSError), socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.shutdown(socket.SHUT_RDWR)  # of the socket itself, not just of this duplicate of its descriptor


class _Deadline:
    """Shuts a connection's socket down if the server has not answered within *seconds*.

    Not ``asyncio.timeout``: a psycopg query cancelled by the event loop sends the server a cancel request and
    waits for it, which with a libpq older than 17 runs in a thread with no time limit of its own, so a frozen
    server would hold it forever. A socket shut down makes the pending read fail at once instead; the connection
    is broken, and the pool discards it.
    """

    __slots__ = ("_conn", "_handle", "expired")

    def __init__(self, conn: _Connection, seconds: float) -> None:
        self._conn = conn
        self.expired = False
        self._handle = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        _shut_down(self._conn)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._handle.cancel()


class _Step(NamedTuple):
    """One statement an operation asks its runner to execute: *rows* if the first row of its result is wanted."""

    doing: str
    query: bytes
    params: dict[str, Any] | None
    rows: bool = False


_Result = tuple[int, TupleRow | None]  # the row count, and the first row if one was asked for
_Plan = Generator[_Step, _Result, _T]
"""An operation, written once: it yields the statements to run and receives each one's result; a sync or an async
runner executes them (``_run``), so that both stores run the same logic and the same SQL."""


class _PostgresBase:
    """What :class:`PostgresStore` and :class:`SyncPostgresStore` share: options, SQL, the logic of every operation
    (as plans), error messages. Each subclass adds a runner over its own kind of connection and pool."""

    def __init__(
        self,
        conninfo: str = "",
        *,
        table: str = "idempo_records",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
        pool_timeout: float = 5.0,
        reconnect_timeout: float = 10.0,
        application_name: str | None = None,
        prepare: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            msg = (
                f"table name {table!r} must be letters, digits and underscores (at most 48), not starting with a digit"
            )
            raise ConfigurationError(msg)
        if min_size < 0 or max_size < 1 or max_size < min_size:
            msg = f"need 0 <= min_size <= max_size and max_size >= 1, not min_size={min_size}, max_size={max_size}"
            raise ConfigurationError(msg)
        timeouts = {
            "connect_timeout": connect_timeout,
            "statement_timeout": statement_timeout,
            "pool_timeout": pool_timeout,
            "reconnect_timeout": reconnect_timeout,
        }
        for name, value in timeouts.items():
            if not value > 0 or math.isinf(value):
                msg = f"{name} must be a positive number of seconds, not {value}"
                raise ConfigurationError(msg)
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            msg = f"invalid PostgreSQL connection string {_display(conninfo)!r}: {exc}"
            raise ConfigurationError(msg) from None
        # Everything a twin needs to be built alike (see PostgresStore.sync).
        self._options: dict[str, Any] = {
            "table": table,
            "min_size": min_size,
            "max_size": max_size,
            **timeouts,
            "application_name": application_name,
            "prepare": prepare,
            "clock": clock,
        }
        self._conninfo = conninfo
        self._conninfo_params = params
        self._display = _display(conninfo)
        self._table = table
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = max(2, math.ceil(connect_timeout))
        self._statement_timeout = statement_timeout
        self._pool_timeout = pool_timeout
        self._reconnect_timeout = reconnect_timeout
        self._answer_timeout = statement_timeout + _ANSWER_GRACE
        self._application_name = application_name or str(params.get("application_name") or "idempo")
        self._prepare = prepare
        self._clock = clock
        self._sql = _Statements(table)
        self._set_timeout = f"SET statement_timeout = {int(statement_timeout * 1000)}".encode()
        self._closed = False
        self._scan_page_size = _SCAN_PAGE
        self._set_up_runner()

    def _set_up_runner(self) -> None:
        """The state of the subclass's runner (its pool, and what guards it); called last by ``__init__``."""
        raise NotImplementedError

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``postgresql://user:password@host:port/dbname?options`` (or ``postgres://``).

        The store's query options are ``table``, ``min_size``, ``max_size``, ``connect_timeout``,
        ``statement_timeout``, ``pool_timeout``, ``reconnect_timeout`` (seconds) and ``prepare``; they are
        removed from the URL, and every other option (``sslmode``, ``application_name``...) is left for libpq.
        """
        options.setdefault("table", url.option("table", "idempo_records"))
        options.setdefault("min_size", url.int_option("min_size", 1))
        options.setdefault("max_size", url.int_option("max_size", 10))
        for name in ("connect_timeout", "statement_timeout", "pool_timeout"):
            options.setdefault(name, url.float_option(name, 5.0))
        options.setdefault("reconnect_timeout", url.float_option("reconnect_timeout", 10.0))
        options.setdefault("prepare", (url.option("prepare") or "true").lower() not in _FALSE)
        return cls(_strip_options(url), **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._display!r}, table={self._table!r})"

    def _closed_error(self) -> StoreError:
        return StoreError(f"PostgreSQL store {self._display!r} is closed")

    def _error(self, exc: BaseException, doing: str, *, no_answer: bool = False) -> StoreError:
        if no_answer:
            detail = f"no answer within {self._answer_timeout:g} s; connection closed ({type(exc).__name__}: {exc})"
        elif isinstance(exc, PoolTimeout):
            detail = f"no connection within {self._pool_timeout:g} s (is the server up? is the pool too small?)"
        elif isinstance(exc, TimeoutError):
            detail = f"no answer within {self._answer_timeout:g} s"
        else:
            detail = f"{type(exc).__name__}: {exc}".strip()
        return StoreError(f"PostgreSQL store {self._display!r}, {doing}: {detail}")

    def _connect_kwargs(self) -> dict[str, Any]:
        """libpq options of every connection, beside *conninfo*."""
        return {
            "autocommit": True,
            "connect_timeout": self._connect_timeout,
            "application_name": self._application_name,
        }

    def _pool_options(self) -> dict[str, Any]:
        """The pool's options (either kind of pool)."""
        return {
            "kwargs": self._connect_kwargs(),
            "min_size": self._min_size,
            "max_size": self._max_size,
            "open": False,
            "name": f"idempo-{self._table}",
            "timeout": self._pool_timeout,
            "reconnect_timeout": self._reconnect_timeout,
        }

    def _params(self, **params: Any) -> dict[str, Any]:
        # lease and ttl always as floats: one set of parameter types, one prepared statement per connection.
        params["now"] = None if self._clock is None else self._clock()
        return params

    # -- the operations, as plans ---------------------------------------------------------------------------

    def _create_table_plan(self) -> _Plan[None]:
        """Run in one transaction, on a connection of its own: the table and its index, unless both exist."""
        names = {"table": self._sql.table_name, "index": self._sql.index_name}
        _, row = yield _Step("creating the table", self._sql.exists, names, rows=True)
        if row is not None and row[0]:
            return  # nothing to create, and no lock to take
        yield _Step("creating the table", self._sql.lock, names)
        for statement in self._sql.create:
            yield _Step("creating the table", statement, None)

    def _claim_plan(self, key: str, fingerprint: str, lease: float, ttl: float, token: str | None) -> _Plan[Claim]:
        token = token or new_token()
        for _ in range(_CLAIM_ATTEMPTS):
            params = self._params(key=key, fingerprint=fingerprint, token=token, lease=float(lease), ttl=float(ttl))
            _, row = yield _Step("claim", self._sql.claim, params, rows=True)
            if row is not None:
                return Acquired(token) if row[0] else Existing(record_from_row(row[1:]))
            # Another claim committed this key after our snapshot was taken: look again, with a fresh snapshot.
        msg = f"PostgreSQL store {self._display!r}, claim: key {key!r} kept changing under {_CLAIM_ATTEMPTS} attempts"
        raise StoreError(msg)

    def _renew_plan(self, key: str, token: str, lease: float) -> _Plan[bool]:
        count, _ = yield _Step("renew", self._sql.renew, self._params(key=key, token=token, lease=float(lease)))
        return count == 1

    def _complete_plan(self, key: str, token: str, payload: bytes, ttl: float) -> _Plan[bool]:
        params = self._params(key=key, token=token, payload=payload, ttl=float(ttl))
        count, _ = yield _Step("complete", self._sql.complete, params)
        return count == 1

    def _release_plan(self, key: str, token: str) -> _Plan[bool]:
        count, _ = yield _Step("release", self._sql.release, self._params(key=key, token=token))
        return count == 1

    def _get_plan(self, key: str) -> _Plan[Record | None]:
        _, row = yield _Step("get", self._sql.get, self._params(key=key), rows=True)
        return None if row is None else record_from_row(row)

    def _delete_plan(self, key: str) -> _Plan[bool]:
        count, _ = yield _Step("delete", self._sql.delete, {"key": key})
        return count == 1

    def _purge_plan(self) -> _Plan[int]:
        purged = 0
        while True:
            count, _ = yield _Step("purge_expired", self._sql.purge, self._params(batch=_PURGE_BATCH))
            purged += max(count, 0)
            if count < _PURGE_BATCH:
                return purged

    def _scan_step(self, prefix: str, page: Page) -> _Step:
        """The statement of one page of a scan (its rows are all wanted: see the runners' ``_fetch_page``)."""
        params = self._params(pattern=like_prefix(prefix), size=page.size)
        if page.after is None:
            return _Step("scan", self._sql.scan_first, params)
        params["after"] = page.after
        return _Step("scan", self._sql.scan_next, params)


class PostgresStore(_PostgresBase):
    """Records in a PostgreSQL table: one statement per operation, shared by every process and machine.

    The pool opens lazily, on first use, inside the running event loop: a store may be created at import time.
    Use one store per event loop (a pool belongs to the loop that opened it) and :meth:`close` it at shutdown.
    Call :meth:`purge_expired` from time to time (e.g. from a scheduled job): PostgreSQL does not drop expired
    rows on its own, although the store never shows them. :meth:`sync` gives its blocking twin.

    Args:
        conninfo: a libpq connection string or URL, e.g. ``"postgresql://app:secret@db.internal/app"`` or
            ``"host=db dbname=app"``. libpq's environment variables (``PGHOST``, ``PGPASSWORD``...) apply.
        table: the table's name (letters, digits and underscores, at most 48); created on first use, with an
            index ``<table>_expires_at``.
        min_size: connections the pool keeps open.
        max_size: connections the pool may open; more concurrent operations wait for one.
        connect_timeout: seconds to open a connection (libpq counts whole seconds, at least 2).
        statement_timeout: seconds a statement may run on the server (set as ``statement_timeout`` on every
            connection), e.g. while it waits for a row lock.
        pool_timeout: seconds an operation waits for a connection of the pool, e.g. while the server is down.
        reconnect_timeout: seconds the pool keeps retrying a connection that fails before giving up on it (the
            next operation starts a new attempt); a short one means a quick recovery once the server is back.
        application_name: the ``application_name`` the server shows for the store's connections; by default the
            one in *conninfo*, else ``"idempo"``.
        prepare: use prepared statements (one round trip per operation). Turn it off behind a connection
            pooler that does not support them (PgBouncer before 1.21 in transaction mode).
        clock: for tests only: seconds since the epoch, instead of the server's clock.
    """

    def _set_up_runner(self) -> None:
        self._pool: AsyncConnectionPool[_Connection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Task[AsyncConnectionPool[_Connection]] | None = None
        self._sync_twin: SyncPostgresStore | None = None

    def sync(self) -> SyncPostgresStore:
        """The blocking twin of this store (for the decorator on sync functions): a :class:`SyncPostgresStore`
        on the same server and table, with the same options, and a pool of its own. Always the same one;
        :meth:`close` closes it too."""
        if self._closed:
            raise self._closed_error()
        if self._sync_twin is None:
            self._sync_twin = SyncPostgresStore(self._conninfo, **self._options)
        return self._sync_twin

    # -- connections ----------------------------------------------------------------------------------------

    async def _configure(self, conn: _Connection) -> None:
        with _Deadline(conn, self._answer_timeout):
            await conn.execute(self._set_timeout)

    async def _connect(self) -> _Connection:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._connect_kwargs())
        try:
            await self._configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _open(self) -> AsyncConnectionPool[_Connection]:
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

    async def _start(self) -> AsyncConnectionPool[_Connection]:
        deadline = None
        try:
            # On a connection of its own, so that a wrong password or database name comes out as such,
            # not as a pool timeout.
            conn = await self._connect()
            try:
                # A few statements, one of which may wait for another process's lock (statement_timeout).
                with _Deadline(conn, self._answer_timeout * 3) as deadline:
                    await self._create_table(conn)
            finally:
                await conn.close()
        except _FAILURES as exc:
            no_answer = deadline is not None and deadline.expired
            raise self._error(exc, "creating the table", no_answer=no_answer) from exc
        pool: AsyncConnectionPool[_Connection] = AsyncConnectionPool(
            self._conninfo, configure=self._configure, **self._pool_options()
        )
        await pool.open(wait=False)
        if self._closed:  # while this was opening
            await pool.close()
            raise self._closed_error()
        self._pool, self._loop = pool, asyncio.get_running_loop()
        return pool

    async def _create_table(self, conn: _Connection) -> None:
        plan = self._create_table_plan()
        async with conn.transaction():
            try:
                step = next(plan)
                while True:
                    cursor = await conn.execute(step.query, step.params)
                    step = plan.send((cursor.rowcount, await cursor.fetchone() if step.rows else None))
            except StopIteration:
                pass

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        """A live connection of the pool. One the server closed while it was idle is dropped, not used."""
        pool = self._pool
        if pool is None or self._loop is not asyncio.get_running_loop():
            pool = await self._open()
        deadline = time.monotonic() + self._pool_timeout
        while True:
            conn = await pool.getconn(timeout=max(0.0, deadline - time.monotonic()))
            if not _has_input(conn):
                break
            try:
                with _Deadline(conn, self._answer_timeout):
                    await conn.execute(b"")  # reads what is there: a notice, or the server's goodbye
            except psycopg.Error:
                await pool.putconn(conn)  # broken: the pool discards it, and opens a new one in the background
                continue
            break
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    async def _execute(self, doing: str, query: bytes, params: dict[str, Any], *, rows: bool = False) -> _Result:
        """Run *query*: its row count, and, if it returns *rows*, the first one."""
        deadline = None
        try:
            async with self._connection() as conn:
                with _Deadline(conn, self._answer_timeout) as deadline:
                    cursor = await conn.execute(query, params, prepare=self._prepare, binary=True)
                    # Not cursor.description: it builds column objects, which costs more than the rest of this.
                    row = await cursor.fetchone() if rows else None
                    return cursor.rowcount, row
        except StoreError:
            raise
        except _FAILURES as exc:
            raise self._error(exc, doing, no_answer=deadline is not None and deadline.expired) from exc

    async def _run(self, plan: _Plan[_T]) -> _T:
        """Execute *plan*'s statements, each on a connection of the pool."""
        try:
            step = next(plan)
            while True:
                step = plan.send(await self._execute(step.doing, step.query, step.params or {}, rows=step.rows))
        except StopIteration as done:
            result: _T = done.value
            return result

    async def _fetch_page(self, step: _Step) -> list[Record]:
        """Run *step*, a page of a scan, on a connection of the pool: every row it returns, as records."""
        deadline = None
        try:
            async with self._connection() as conn:
                with _Deadline(conn, self._answer_timeout) as deadline:
                    cursor = await conn.execute(step.query, step.params, prepare=self._prepare, binary=True)
                    rows = await cursor.fetchall()
        except StoreError:
            raise
        except _FAILURES as exc:
            raise self._error(exc, step.doing, no_answer=deadline is not None and deadline.expired) from exc
        return [record_from_row(row) for row in rows]

    # -- the Store protocol ---------------------------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return await self._run(self._claim_plan(key, fingerprint, lease, ttl, token))

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return await self._run(self._renew_plan(key, token, lease))

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return await self._run(self._complete_plan(key, token, payload, ttl))

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return await self._run(self._release_plan(key, token))

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return await self._run(self._get_plan(key))

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return await self._run(self._delete_plan(key))

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Deletes in batches of 10,000 rows, one statement each, and
        skips rows another session holds locked at that moment (they are left for the next purge)."""
        return await self._run(self._purge_plan())

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order (the table's collation), reading
        pages of 100 records, one statement each: ``WHERE key > <last key> AND key LIKE <prefix>% ORDER BY key``.
        (A ``LIKE`` under a collation other than ``C`` cannot narrow the index scan: a prefix matching few of
        many records walks the index.)"""
        plan = keyset_plan(limit, self._scan_page_size)
        return run_plan_async(plan, lambda page: self._fetch_page(self._scan_step(prefix, page)))

    async def close(self) -> None:
        """Close the pool and its connections, and those of the :meth:`sync` twin. The store is not used
        afterwards."""
        self._closed = True
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            with suppress(StoreError):
                await opening  # bounded by connect_timeout and statement_timeout; closes its pool itself
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        twin, self._sync_twin = self._sync_twin, None
        if twin is not None:
            await asyncio.to_thread(twin.close)


_SyncConnection = psycopg.Connection[TupleRow]


class _Guard:
    """One statement the watchdog keeps an eye on; see :class:`_Watchdog`."""

    __slots__ = ("conn", "done", "expired")

    def __init__(self, conn: psycopg.BaseConnection[Any]) -> None:
        self.conn = conn
        self.done = False
        self.expired = False


class _Watchdog:
    """:class:`_Deadline` for blocking connections: one daemon thread, shared by every sync store, shuts down the
    socket of a connection whose server has not answered by its deadline. A blocking libpq call cannot be
    interrupted from its own thread; its socket can be shut down from another one, which makes it fail at once.

    A deadline ends (``with``) under the same lock the watchdog fires under, so a connection that was answered
    in time, and may already serve another statement, is never shut down late."""

    def __init__(self) -> None:
        self._reset()
        # A forked child has no watchdog thread (and must not use its parent's connections anyway): start afresh.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Guard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def deadline(self, conn: psycopg.BaseConnection[Any], seconds: float) -> Iterator[_Guard]:
        guard = _Guard(conn)
        entry = (time.monotonic() + seconds, next(self._order), guard)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="idempo-postgres-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        try:
            yield guard
        finally:
            with self._cond:
                guard.done = True

    def _watch(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                wait = heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, guard = heapq.heappop(heap)
                guard.expired = True
                _shut_down(guard.conn)


_watchdog = _Watchdog()


class SyncPostgresStore(_PostgresBase):
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

    # -- connections ----------------------------------------------------------------------------------------

    def _configure(self, conn: _SyncConnection) -> None:
        with _watchdog.deadline(conn, self._answer_timeout):
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
                with _watchdog.deadline(conn, self._answer_timeout * 3) as guard:
                    self._create_table(conn)
        except _FAILURES as exc:
            raise self._error(exc, "creating the table", no_answer=guard is not None and guard.expired) from exc
        pool: ConnectionPool[_SyncConnection] = ConnectionPool(
            self._conninfo, configure=self._configure, **self._pool_options()
        )
        pool.open(wait=False)
        return pool

    def _create_table(self, conn: _SyncConnection) -> None:
        plan = self._create_table_plan()
        with conn.transaction():
            try:
                step = next(plan)
                while True:
                    cursor = conn.execute(step.query, step.params)
                    step = plan.send((cursor.rowcount, cursor.fetchone() if step.rows else None))
            except StopIteration:
                pass

    @contextmanager
    def _connection(self) -> Iterator[_SyncConnection]:
        """A live connection of the pool. One the server closed while it was idle is dropped, not used."""
        pool = self._pool
        if pool is None:
            pool = self._open()
        deadline = time.monotonic() + self._pool_timeout
        while True:
            conn = pool.getconn(timeout=max(0.0, deadline - time.monotonic()))
            if not _has_input(conn):
                break
            try:
                with _watchdog.deadline(conn, self._answer_timeout):
                    conn.execute(b"")  # reads what is there: a notice, or the server's goodbye
            except psycopg.Error:
                pool.putconn(conn)  # broken: the pool discards it, and opens a new one in the background
                continue
            break
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _execute(self, doing: str, query: bytes, params: dict[str, Any], *, rows: bool = False) -> _Result:
        """Run *query*: its row count, and, if it returns *rows*, the first one."""
        guard = None
        try:
            with self._connection() as conn, _watchdog.deadline(conn, self._answer_timeout) as guard:
                cursor = conn.execute(query, params, prepare=self._prepare, binary=True)
                row = cursor.fetchone() if rows else None
                return cursor.rowcount, row
        except StoreError:
            raise
        except _FAILURES as exc:
            raise self._error(exc, doing, no_answer=guard is not None and guard.expired) from exc

    def _run(self, plan: _Plan[_T]) -> _T:
        """Execute *plan*'s statements, each on a connection of the pool."""
        try:
            step = next(plan)
            while True:
                step = plan.send(self._execute(step.doing, step.query, step.params or {}, rows=step.rows))
        except StopIteration as done:
            result: _T = done.value
            return result

    def _fetch_page(self, step: _Step) -> list[Record]:
        """Run *step*, a page of a scan, on a connection of the pool: every row it returns, as records."""
        guard = None
        try:
            with self._connection() as conn, _watchdog.deadline(conn, self._answer_timeout) as guard:
                cursor = conn.execute(step.query, step.params, prepare=self._prepare, binary=True)
                rows = cursor.fetchall()
        except StoreError:
            raise
        except _FAILURES as exc:
            raise self._error(exc, step.doing, no_answer=guard is not None and guard.expired) from exc
        return [record_from_row(row) for row in rows]

    # -- the SyncStore protocol -----------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return self._run(self._claim_plan(key, fingerprint, lease, ttl, token))

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return self._run(self._renew_plan(key, token, lease))

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return self._run(self._complete_plan(key, token, payload, ttl))

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return self._run(self._release_plan(key, token))

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return self._run(self._get_plan(key))

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return self._run(self._delete_plan(key))

    def purge_expired(self) -> int:
        """See :meth:`PostgresStore.purge_expired`."""
        return self._run(self._purge_plan())

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`PostgresStore.scan`."""
        plan = keyset_plan(limit, self._scan_page_size)
        return run_plan(plan, lambda page: self._fetch_page(self._scan_step(prefix, page)))

    def close(self) -> None:
        """Close the pool and its connections. The store is not used afterwards."""
        self._closed = True
        with self._lock:  # waits for an opening in progress (bounded by connect_timeout and statement_timeout)
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
