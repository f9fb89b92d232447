"""What the PostgreSQL stores share: the options, the error messages, and every operation written once as a plan (see
:mod:`idempo._core.plans`) that yields the statements to run and receives their results. Strictly private (see
``postgres.py``'s docstring).
"""

from __future__ import annotations

import getpass
import math
import os
import re
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, Final, NamedTuple, Self, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from .._core.bound import Target
from .._core.errors import ConfigurationError, StoreError
from .._core.records import Acquired, Claim, Existing, Record, new_token
from ._postgres_pool import PoolTimeout as AsyncPoolTimeout
from ._postgres_sql import Statements
from ._rows import record_from_row
from ._scan import Page, ScanPlan, keyset_plan, like_prefix
from ._url import StoreURL, redact

__all__ = [
    "ALL",
    "CLAIM_ATTEMPTS",
    "COUNT",
    "FAILURES",
    "FIRST",
    "Drop",
    "PostgresOperations",
    "Probe",
    "Step",
    "Take",
    "claim_of",
    "owned",
]

_T = TypeVar("_T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
CLAIM_ATTEMPTS: Final = 10  # statements a claim makes at most, while the key keeps changing under it
_ANSWER_GRACE = 1.0  # seconds the client waits past statement_timeout for an answer before it gives up
_PURGE_BATCH = 10_000
_SCAN_PAGE = 100  # records per statement of a scan (payloads included: each may be large)
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

FAILURES = (psycopg.Error, PoolTimeout, OSError, TimeoutError)
"""psycopg's errors, the pool's, and what the socket layer or a client-side timeout may raise."""


def conninfo_identity(params: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(host, port, dbname)`` of a connection string's parameters, with libpq's defaults and environment: which
    database a connection opened with them reaches, as far as the client can tell."""
    environ = os.environ
    host = str(params.get("host") or params.get("hostaddr") or environ.get("PGHOST") or "")
    port = str(params.get("port") or environ.get("PGPORT") or "5432")
    user = params.get("user") or environ.get("PGUSER") or getpass.getuser()
    dbname = str(params.get("dbname") or environ.get("PGDATABASE") or user)
    return host, port, dbname


def _display(conninfo: str) -> str:
    """*conninfo* without its password, for messages and reprs."""
    if "://" in conninfo:
        return redact(conninfo)
    return _PASSWORD_PARAM.sub(r"\1***", conninfo)


def strip_options(url: StoreURL) -> str:
    """The libpq URL of *url*: the store's own options removed from the query string, the rest kept as written."""
    base, _, rest = url.raw.partition("?")
    base = url.scheme + base[base.index("://") :]  # libpq wants the scheme in lower case
    query = rest.partition("#")[0]
    kept = [part for part in query.split("&") if part and part.partition("=")[0] not in _URL_OPTIONS]
    return f"{base}?{'&'.join(kept)}" if kept else base


# -- effects --------------------------------------------------------------------------------------------------------

COUNT, FIRST, ALL = 0, 1, 2
"""What a :class:`Step` wants of its statement's result: the row count; the row count and the first row; every row."""


class Step(NamedTuple):
    """Effect: run one statement, *doing* this (for messages), on a connection of the pool (or, while the table is
    made, on the connection that makes it). Its result: ``(row count, first row or None)``, or every row (*rows*
    ``ALL``)."""

    doing: str
    query: bytes
    params: dict[str, Any] | None
    rows: int = COUNT


class Take(NamedTuple):
    """Effect: a connection of the pool, within *timeout* seconds (``PoolTimeout`` if none comes)."""

    timeout: float


class Probe(NamedTuple):
    """Effect: read what an idle connection of the pool holds (a notice, or the server's goodbye). Its result: whether
    the connection is alive."""

    conn: Any


class Drop(NamedTuple):
    """Effect: give a connection back to the pool, which discards it if it is broken."""

    conn: Any


_Plan = Generator[Step, Any, _T]


def owned(count: int) -> bool:
    """What a fenced statement (``renew``, ``complete``, ``release``) answered with its row count: whether the token
    still owned the key, and the statement changed its row."""
    return count == 1


def claim_of(row: Any, token: str) -> Claim | None:
    """What the claim's statement answered in *row*: the key taken with *token*, or the live record found; ``None``
    if neither, when another claim committed the key after the statement's snapshot was taken (then look again,
    with a fresh snapshot)."""
    if row is None:
        return None
    return Acquired(token) if row[0] else Existing(record_from_row(row[1:]))


class PostgresOperations:
    """What :class:`~idempo.stores.postgres.PostgresStore` and its sync twin share: options, SQL, the logic of
    every operation (as plans), error messages. Each store adds a runner over its own kind of connection and pool,
    which performs the plans' effects."""

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
        self._sql = Statements(table)
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
        return cls(strip_options(url), **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._display!r}, table={self._table!r})"

    def _transaction_target(self) -> Target:
        """Where this store keeps its records, for a transaction of the application's on the same database
        (:mod:`idempo.transactions`)."""
        clock = self._clock
        return Target(
            "postgresql",
            conninfo_identity(self._conninfo_params),
            self._sql.complete_named,
            (lambda: None) if clock is None else clock,
            repr(self),
        )

    def _closed_error(self) -> StoreError:
        return StoreError(f"PostgreSQL store {self._display!r} is closed")

    def _error(self, exc: BaseException, doing: str, *, no_answer: bool = False) -> StoreError:
        if no_answer:
            detail = f"no answer within {self._answer_timeout:g} s; connection closed ({type(exc).__name__}: {exc})"
        elif isinstance(exc, PoolTimeout | AsyncPoolTimeout):
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
        params["now"] = self._now()
        return params

    def _now(self) -> float | None:
        """The statements' *now*: ``None`` (the server's clock), or the clock given for tests."""
        return None if self._clock is None else self._clock()

    # -- the operations, as plans ---------------------------------------------------------------------------

    def _create_table_plan(self) -> _Plan[None]:
        """Run in one transaction, on a connection of its own: the table and its index, unless both exist."""
        names = {"table": self._sql.table_name, "index": self._sql.index_name}
        _, row = yield Step("creating the table", self._sql.exists, names, rows=FIRST)
        if row is not None and row[0]:
            return  # nothing to create, and no lock to take
        yield Step("creating the table", self._sql.lock, names)
        for statement in self._sql.create:
            yield Step("creating the table", statement, None)

    def _claim_plan(
        self, key: str, fingerprint: str, lease: float, ttl: float, token: str | None, attempts: int = CLAIM_ATTEMPTS
    ) -> _Plan[Claim]:
        """The claim, in *attempts* statements at most (the async store makes the first of them outside the plan,
        see ``PostgresStore.claim``, and leaves it the others)."""
        token = token or new_token()
        for _ in range(attempts):
            params = self._params(key=key, fingerprint=fingerprint, token=token, lease=float(lease), ttl=float(ttl))
            _, row = yield Step("claim", self._sql.claim, params, rows=FIRST)
            claim = claim_of(row, token)
            if claim is not None:
                return claim
        msg = f"PostgreSQL store {self._display!r}, claim: key {key!r} kept changing under {CLAIM_ATTEMPTS} attempts"
        raise StoreError(msg)

    def _renew_plan(self, key: str, token: str, lease: float) -> _Plan[bool]:
        count: int
        count, _ = yield Step("renew", self._sql.renew, self._params(key=key, token=token, lease=float(lease)))
        return owned(count)

    def _complete_plan(self, key: str, token: str, payload: bytes, ttl: float) -> _Plan[bool]:
        params = self._params(key=key, token=token, payload=payload, ttl=float(ttl))
        count: int
        count, _ = yield Step("complete", self._sql.complete, params)
        return owned(count)

    def _release_plan(self, key: str, token: str) -> _Plan[bool]:
        count: int
        count, _ = yield Step("release", self._sql.release, self._params(key=key, token=token))
        return owned(count)

    def _get_plan(self, key: str) -> _Plan[Record | None]:
        _, row = yield Step("get", self._sql.get, self._params(key=key), rows=FIRST)
        return None if row is None else record_from_row(row)

    def _delete_plan(self, key: str) -> _Plan[bool]:
        count: int
        count, _ = yield Step("delete", self._sql.delete, {"key": key})
        return count == 1

    def _purge_plan(self) -> _Plan[int]:
        purged = 0
        while True:
            count: int
            count, _ = yield Step("purge_expired", self._sql.purge, self._params(batch=_PURGE_BATCH))
            purged += max(count, 0)
            if count < _PURGE_BATCH:
                return purged

    def _scan_plan(self, prefix: str, limit: int | None) -> ScanPlan[Step]:
        """A scan: keyset pages of the primary key's index, one statement each."""
        return keyset_plan(limit, self._scan_page_size, lambda page: self._page_plan(prefix, page))

    def _page_plan(self, prefix: str, page: Page) -> _Plan[list[Record]]:
        params = self._params(pattern=like_prefix(prefix), size=page.size)
        if page.after is None:
            rows = yield Step("scan", self._sql.scan_first, params, rows=ALL)
        else:
            params["after"] = page.after
            rows = yield Step("scan", self._sql.scan_next, params, rows=ALL)
        return [record_from_row(row) for row in rows]

    def _live_connection_plan(self) -> Generator[Take | Probe | Drop, Any, Any]:
        """A live connection of the pool, within ``pool_timeout``: one the server closed while it was idle is
        dropped, not used. An idle connection has nothing to read, so only one whose socket is readable is looked
        at (no round trip for the others)."""
        deadline = time.monotonic() + self._pool_timeout
        while True:
            conn = yield Take(max(0.0, deadline - time.monotonic()))
            if not self._has_input(conn):
                return conn
            alive: bool = yield Probe(conn)
            if alive:
                return conn
            yield Drop(conn)  # broken: the pool discards it, and opens a new one in the background

    def _has_input(self, conn: Any) -> bool:
        """Whether an idle connection of the pool has something to read (then it is probed before it is used)."""
        raise NotImplementedError
