"""The response committed in the same database transaction as the business writes: exactly once, across a crash.

Every idempotency middleware has one window: the handler commits the charge, then the process dies (an OOM kill, a
deploy, a lost node) before the response reaches the store; the lease runs out, the client retries with the same key,
and the charge runs a second time. When the store's table lives in the application's own PostgreSQL or SQLite
database, :func:`record` closes it: called inside the handler's transaction, just before it commits, it completes
the request's key on the application's connection, so that the business rows and the response commit together, or
neither does. After a crash before the commit nothing happened, and a retry runs the operation (once the lease is
over); after a crash after it, a retry gets the response replayed. Never a second execution.

::

    from idempo.transactions import record

    @app.post("/charges")
    def charge(order: Order, session: Session = Depends(session)) -> JSONResponse:
        with session.begin():
            session.add(Charge(amount=order.amount))
            response = JSONResponse({"charged": order.amount}, status_code=201)
            record(session, response)  # commits with the charge
        return response

The connection may be a SQLAlchemy ``Session`` or ``Connection`` (:func:`record_async`: ``AsyncSession``,
``AsyncConnection``), a psycopg 3 connection (sync or async), a ``sqlite3`` connection, or a Django database
connection (``django.db.connection``; the Django middleware records for the views by itself, see
:mod:`idempo.django`). The response is a Starlette, Django or Flask response whose body is known, or a
``(status, headers, body)`` tuple; what :func:`record` stores is what every retry gets back.

The store must keep its records in that same database: :func:`store_for` builds one from the application's
SQLAlchemy engine, psycopg pool, Django connection or sqlite3 connection. The store uses connections of its own for
the claim (which must commit at once, before the handler runs, for concurrent requests to see it) and for the
renewal of the lease; only the completion goes through the application's transaction, where it replaces the
middleware's own write rather than adding one.

Fencing holds inside the transaction: the completion touches the record only if the key is still this request's
(same token, still in progress). If it is not -- the lease ran out and a retry took the key over --
:class:`~idempo.KeyTakenOverError` is raised inside the transaction: let it propagate, and the business writes roll
back with it. On PostgreSQL the completion holds the record's row lock until the transaction ends, so no other
request can take the key over between the completion and the commit.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

from ._core.bound import Bound, pyformat, response_parts
from ._core.bound import current as _current
from ._core.errors import (
    ConfigurationError,
    KeyTakenOverError,
    NotClaimedError,
    TransactionError,
    WrongDatabaseError,
)

if TYPE_CHECKING:
    from .stores import Store, SyncStore

__all__ = [
    "KeyTakenOverError",
    "NotClaimedError",
    "TransactionError",
    "WrongDatabaseError",
    "claimed",
    "record",
    "record_async",
    "store_for",
]


def claimed() -> bool:
    """Whether a keyed request is running in this context, under a key idempo claimed: whether :func:`record` has
    a key to complete (it raises :class:`~idempo.NotClaimedError` otherwise). ``False`` for a request without an
    ``Idempotency-Key``, and for one let through unprotected when the store failed (``on_store_error="fail_open"``)."""
    return _current() is not None


def _bound() -> Bound:
    bound = _current()
    if bound is None:
        msg = (
            "no keyed request is running here: the request has no Idempotency-Key, or the store failed and "
            "on_store_error='fail_open' let it through, or this code runs outside the application idempo wraps. "
            "Check idempo.transactions.claimed() first where that can happen"
        )
        raise NotClaimedError(msg)
    return bound


def record(connection: Any, response: Any) -> bool:
    """Complete the running keyed request's key with *response*, inside the transaction open on *connection*, so
    that it commits (or rolls back) with the business writes. Call it last in the transaction, just before it
    commits.

    Args:
        connection: a SQLAlchemy ``Session`` or ``Connection``, a ``psycopg.Connection``, a ``sqlite3.Connection``
            or a Django database connection (``django.db.connection``, ``connections[alias]``), with a transaction
            open (or about to be: SQLAlchemy and sqlite3 begin one implicitly), on the store's database.
        response: the response the handler returns: a Starlette, Django or Flask response whose body is known, or
            ``(status, headers, body)``.

    Returns:
        ``True`` if the response is recorded; ``False`` if it is one that is not kept (a 5xx, unless
        ``store_server_errors``): the key is released after the request, as without a transaction.

    Raises:
        NotClaimedError: no keyed request is running here (see :func:`claimed`), or its response was recorded by a
            transaction that committed already.
        WrongDatabaseError: *connection* is not on the store's database, or the store is not SQL.
        KeyTakenOverError: the key is no longer this request's: let it propagate, so that the transaction rolls back.
        TransactionError: no transaction is open on *connection*.
        TypeError: *response* is streaming (its body is not known yet), or *connection* is of no known kind.
    """
    bound = _bound()
    kind = _kind(connection)
    if kind == "sqlalchemy" and not _sqlalchemy_async(connection):
        return _record_sqlalchemy(bound, connection, response)
    if kind == "psycopg" and not _psycopg_async(connection):
        return _record_psycopg(bound, connection, response)
    if kind == "sqlite3":
        return _record_sqlite3(bound, connection, response)
    if kind == "django":
        return record_django(bound, connection, response)
    msg = f"cannot record in a transaction of {type(connection).__name__!r}: use record_async for async connections"
    raise TypeError(msg)


async def record_async(connection: Any, response: Any) -> bool:
    """:func:`record` for async connections: a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, or a
    ``psycopg.AsyncConnection``."""
    bound = _bound()
    kind = _kind(connection)
    if kind == "sqlalchemy" and _sqlalchemy_async(connection):
        return await _record_sqlalchemy_async(bound, connection, response)
    if kind == "psycopg" and _psycopg_async(connection):
        return await _record_psycopg_async(bound, connection, response)
    msg = f"cannot record in a transaction of {type(connection).__name__!r}: use record for sync connections"
    raise TypeError(msg)


def _sqlalchemy_async(connection: object) -> bool:
    """Whether *connection* is one of SQLAlchemy's asyncio objects (``AsyncSession``, ``AsyncConnection``)."""
    return type(connection).__module__.startswith("sqlalchemy.ext.asyncio")


def _kind(connection: object) -> str:
    module = type(connection).__module__.partition(".")[0]
    if module in {"sqlalchemy", "psycopg", "sqlite3", "django"}:
        return module
    if module in {"_sqlite3", "pysqlite2"}:
        return "sqlite3"
    return module


def _not_in_transaction(what: str) -> TransactionError:
    return TransactionError(
        f"no transaction is open on this {what}: record the response inside the transaction that makes the "
        "business writes, before it commits (in autocommit mode, the record would commit on its own)"
    )


# -- sqlite3 ---------------------------------------------------------------------------------------------------------


def _sqlite_identity(connection: Any) -> tuple[str]:
    for _, name, path in connection.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return (os.path.realpath(path) if path else ":memory:",)
    return (":memory:",)  # pragma: no cover - every connection has a main database


def _record_sqlite3(bound: Bound, connection: Any, response: Any) -> bool:
    target = bound.require("sqlite", _sqlite_identity(connection))
    status, headers, body = response_parts(response)
    completion = bound.completion(target, status, headers, body)
    if completion is None:
        return False
    if not connection.in_transaction and connection.isolation_level is None:
        raise _not_in_transaction("sqlite3 connection")
    statement, params = completion
    bound.recorded(connection.execute(statement, params).rowcount)
    return True


# -- psycopg 3 -------------------------------------------------------------------------------------------------------


def _psycopg_identity(connection: Any) -> tuple[str, str, str]:
    info = connection.info
    return str(info.host or ""), str(info.port or "5432"), str(info.dbname)


def _psycopg_async(connection: Any) -> bool:
    from psycopg import AsyncConnection

    return isinstance(connection, AsyncConnection)


def _psycopg_check(connection: Any) -> None:
    from psycopg.pq import TransactionStatus

    status = connection.info.transaction_status
    if status == TransactionStatus.IDLE and connection.autocommit:
        raise _not_in_transaction("psycopg connection")
    if status == TransactionStatus.INERROR:
        raise TransactionError("the transaction on this psycopg connection failed already: it can only roll back")


def _record_psycopg(bound: Bound, connection: Any, response: Any) -> bool:
    target = bound.require("postgresql", _psycopg_identity(connection))
    status, headers, body = response_parts(response)
    completion = bound.completion(target, status, headers, body)
    if completion is None:
        return False
    _psycopg_check(connection)
    statement, params = completion
    bound.recorded(connection.execute(pyformat(statement), params).rowcount)
    return True


async def _record_psycopg_async(bound: Bound, connection: Any, response: Any) -> bool:
    target = bound.require("postgresql", _psycopg_identity(connection))
    status, headers, body = response_parts(response)
    completion = bound.completion(target, status, headers, body)
    if completion is None:
        return False
    _psycopg_check(connection)
    statement, params = completion
    cursor = await connection.execute(pyformat(statement), params)
    bound.recorded(cursor.rowcount)
    return True


# -- SQLAlchemy 2 ----------------------------------------------------------------------------------------------------


def _sqlalchemy_identity(url: Any) -> tuple[str, tuple[str, ...]]:
    dialect = url.get_backend_name()
    if dialect == "sqlite":
        database = url.database or ""
        return "sqlite", (os.path.realpath(database) if database and database != ":memory:" else ":memory:",)
    if dialect == "postgresql":
        return "postgresql", (str(url.host or ""), str(url.port or 5432), str(url.database or url.username or ""))
    return dialect, (str(url),)


# Per engine (its URL never changes): which database it is on, so that a request does not work it out again.
_ENGINES: weakref.WeakKeyDictionary[Any, tuple[str, tuple[str, ...]]] = weakref.WeakKeyDictionary()
# The completion statements as SQLAlchemy text() clauses, made once per statement (one per store table).
_TEXTS: dict[str, Any] = {}


def _sqlalchemy_database(connection: Any) -> tuple[str, tuple[str, ...]]:
    bind = connection.get_bind() if hasattr(connection, "get_bind") else connection
    engine = bind.engine
    known = _ENGINES.get(engine)
    if known is None:
        known = _ENGINES[engine] = _sqlalchemy_identity(engine.url)
    return known


_SESSION_BOUND = "idempo.bound"  # session.info's key for the claim whose completion the session's transaction holds


def _watch_session(session: Any, bound: Bound) -> None:
    """Tell *bound* when *session*'s transaction commits or rolls back (the face then needs no store call): the claim
    goes in ``session.info``, where listeners of every session (registered once, on the ``Session`` class) find it."""
    global _LISTENING
    if not _LISTENING:
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        event.listen(Session, "after_commit", _session_committed)
        event.listen(Session, "after_rollback", _session_rolled_back)
        _LISTENING = True
    session.info[_SESSION_BOUND] = bound


_LISTENING = False


def _session_committed(session: Any) -> None:
    # Called at every commit of every session of the application: one lookup in a dict, nothing more.
    bound = session.info.get(_SESSION_BOUND)
    if bound is not None:
        session.info[_SESSION_BOUND] = None
        bound.committed()


def _session_rolled_back(session: Any) -> None:
    bound = session.info.get(_SESSION_BOUND)
    if bound is not None:
        session.info[_SESSION_BOUND] = None
        bound.rolled_back()


def _sqlalchemy_completion(bound: Bound, connection: Any, response: Any) -> tuple[Any, dict[str, Any]] | None:
    from sqlalchemy import text

    dialect, identity = _sqlalchemy_database(connection)
    target = bound.require(dialect, identity)
    status, headers, body = response_parts(response)
    completion = bound.completion(target, status, headers, body)
    if completion is None:
        return None
    statement, params = completion
    clause = _TEXTS.get(statement)
    if clause is None:
        clause = _TEXTS[statement] = text(statement)
    return clause, params


def _record_sqlalchemy(bound: Bound, connection: Any, response: Any) -> bool:
    from sqlalchemy.orm import Session

    completion = _sqlalchemy_completion(bound, connection, response)
    if completion is None:
        return False
    statement, params = completion
    bound.recorded(connection.execute(statement, params).rowcount)
    if isinstance(connection, Session):
        _watch_session(connection, bound)
    return True


async def _record_sqlalchemy_async(bound: Bound, connection: Any, response: Any) -> bool:
    from sqlalchemy.ext.asyncio import AsyncSession

    completion = _sqlalchemy_completion(bound, connection, response)
    if completion is None:
        return False
    statement, params = completion
    result = await connection.execute(statement, params)
    bound.recorded(result.rowcount)
    if isinstance(connection, AsyncSession):
        _watch_session(connection.sync_session, bound)
    return True


# -- Django ----------------------------------------------------------------------------------------------------------


def _django_identity(connection: Any) -> tuple[str, tuple[str, ...]]:
    """The dialect and identity of a Django database connection, from its settings (no round trip)."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        name = str(settings["NAME"])
        # Django's test database is in memory under a URI name ("file:memorydb_default?mode=memory&cache=shared").
        if not name or ":memory:" in name or connection.is_in_memory_db():
            return "sqlite", (":memory:",)
        return "sqlite", (os.path.realpath(name),)
    if connection.vendor == "postgresql":
        return "postgresql", (str(settings.get("HOST") or ""), str(settings.get("PORT") or 5432), str(settings["NAME"]))
    return str(connection.vendor), (str(settings.get("NAME")),)


def record_django(bound: Bound, connection: Any, response: Any) -> bool:
    """:func:`record` on a Django database connection (the Django middleware's way too). Private."""
    from django.db import transaction

    dialect, identity = _django_identity(connection)
    target = bound.require(dialect, identity)
    status, headers, body = response_parts(response)
    completion = bound.completion(target, status, headers, body)
    if completion is None:
        return False
    if not connection.in_atomic_block:
        raise _not_in_transaction("Django connection (use transaction.atomic())")
    statement, params = completion
    with connection.cursor() as cursor:
        cursor.execute(pyformat(statement), params)
        bound.recorded(cursor.rowcount)
    transaction.on_commit(bound.committed, using=connection.alias)
    return True


# -- a store on the application's database ---------------------------------------------------------------------------


def store_for(database: Any, *, sync: bool | None = None, **options: Any) -> Store | SyncStore:
    """A store that keeps its records in the application's own database, so that :func:`record` can complete a key
    in the application's transactions.

    Args:
        database: a SQLAlchemy ``Engine`` (a sync store) or ``AsyncEngine`` (an async store), a
            ``psycopg_pool.ConnectionPool`` or ``AsyncConnectionPool``, a Django database connection
            (``django.db.connections[alias]``: a sync store), or a ``sqlite3.Connection`` (a sync store on its
            file).
        sync: a sync store (for the WSGI faces, Django, Flask) or an async one (for the ASGI middleware); by
            default, as *database* is: async for an ``AsyncEngine`` or an ``AsyncConnectionPool``. A FastAPI app
            whose handlers use a sync ``Engine`` passes ``sync=False``.
        options: the store's own options (``table``, ``statement_timeout``, ``busy_timeout``...).

    Returns:
        a :class:`~idempo.stores.postgres.PostgresStore` or :class:`~idempo.SQLiteStore` (async), or their sync
        twins. The store opens connections of its own, to the same database: the claim must commit at once, before
        the handler's transaction begins, for concurrent requests to see it.

    Raises:
        ConfigurationError: the database is neither PostgreSQL nor a SQLite file, or a psycopg pool connects through
            a callable (its ``conninfo`` or ``kwargs``: where it connects is not known before it does).
    """
    module = type(database).__module__.partition(".")[0]
    name = type(database).__name__
    if module == "sqlalchemy":
        url = database.url
        asynchronous = name == "AsyncEngine" if sync is None else not sync
        dialect = url.get_backend_name()
        if dialect == "postgresql":
            conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
            return _postgres(conninfo, asynchronous, options)
        if dialect == "sqlite":
            return _sqlite(url.database or "", asynchronous, options)
        return _unsupported(dialect)
    if module == "psycopg_pool":
        asynchronous = name == "AsyncConnectionPool" if sync is None else not sync
        return _postgres(_pool_conninfo(database), asynchronous, options)
    if module == "django":
        dialect, identity = _django_identity(database)
        if dialect == "sqlite":
            return _sqlite(identity[0], sync is False, options)
        if dialect == "postgresql":
            return _postgres(_django_conninfo(database.settings_dict), sync is False, options)
        return _unsupported(dialect)
    if _kind(database) == "sqlite3":
        return _sqlite(_sqlite_identity(database)[0], sync is False, options)
    msg = f"store_for() takes a SQLAlchemy engine, a psycopg pool, a Django or sqlite3 connection, not {name!r}"
    raise ConfigurationError(msg)


def _pool_conninfo(pool: Any) -> str:
    """Where a psycopg pool connects: its ``conninfo`` with the libpq parameters of its ``kwargs`` (``dbname``,
    ``host``, ``password``...), as the pool passes both to ``connect()``; its other ``kwargs`` (``autocommit``,
    ``prepare_threshold``...) are the application's connections' own, not the store's."""
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    conninfo, kwargs = pool.conninfo, pool.kwargs
    if callable(conninfo) or callable(kwargs):
        msg = (
            "store_for() cannot tell where a psycopg pool connects when its conninfo or kwargs is a callable: build "
            "the store from the same connection string (idempo.stores.postgres.PostgresStore(conninfo, table=...))"
        )
        raise ConfigurationError(msg)
    keywords = {default.keyword.decode() for default in pq.Conninfo.get_defaults()}
    params = {key: value for key, value in (kwargs or {}).items() if key in keywords and value is not None}
    return make_conninfo(conninfo or "", **params)


def _django_conninfo(settings: dict[str, Any]) -> str:
    from psycopg.conninfo import make_conninfo

    params = {
        "dbname": settings.get("NAME"),
        "user": settings.get("USER") or None,
        "password": settings.get("PASSWORD") or None,
        "host": settings.get("HOST") or None,
        "port": settings.get("PORT") or None,
    }
    extra = {key: value for key, value in (settings.get("OPTIONS") or {}).items() if isinstance(value, str | int)}
    return make_conninfo("", **{key: value for key, value in params.items() if value is not None}, **extra)


def _postgres(conninfo: str, asynchronous: bool, options: dict[str, Any]) -> Store | SyncStore:
    from .stores.postgres import PostgresStore, SyncPostgresStore

    if asynchronous:
        return PostgresStore(conninfo, **options)
    return SyncPostgresStore(conninfo, **options)


def _sqlite(path: str, asynchronous: bool, options: dict[str, Any]) -> Store | SyncStore:
    from .stores.sqlite import SQLiteStore, SyncSQLiteStore

    if not path or path == ":memory:":
        msg = "an in-memory SQLite database cannot be shared with a store: use a file"
        raise ConfigurationError(msg)
    if asynchronous:
        return SQLiteStore(path, **options)
    return SyncSQLiteStore(path, **options)


def _unsupported(dialect: str) -> Store:
    msg = (
        f"idempo cannot keep its records in a {dialect} database: recording in the application's transaction "
        "needs PostgreSQL or SQLite"
    )
    raise ConfigurationError(msg)
