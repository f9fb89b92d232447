"""idempo.transactions on the DB-API drivers, in-process: psycopg 3 (an ``AsyncConnectionPool`` behind the ASGI
middleware; a ``ConnectionPool`` behind the WSGI middleware and behind Flask) and the standard library's ``sqlite3``
(behind the WSGI middleware, Flask, and the ASGI middleware with ``store_for(conn, sync=False)``), each store made
by ``store_for`` from the application's own pool or connection.

Every application is one handler, ``POST /charge/<name>``: in one transaction, it inserts a ledger row, then calls
``record()`` (``record_async()``) with the response it is about to return; an ``X-Fault`` request header makes it
go wrong in one way (the key taken over first, a rollback after the record, an exception, a connection outside a
transaction or on another database, a failed transaction). "Exactly once" is counted in the ledger; the faces' store
calls are counted by an :class:`~idempo.observe.Observer`, and what ``complete`` answered by a wrapper of the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import flask
import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idempo import Acquired, ConfigurationError, IdempotencyMiddleware, Record, State
from idempo._core.bound import current
from idempo.flask import Idempotency
from idempo.observe import Outcome, StoreOperation
from idempo.stores import Store, SyncStore, transaction_target
from idempo.stores._forwarding import ForwardingStore
from idempo.stores.postgres import PostgresStore, SyncPostgresStore
from idempo.stores.sqlite import SQLiteStore, SyncSQLiteStore
from idempo.transactions import (
    KeyTakenOverError,
    NotClaimedError,
    TransactionError,
    WrongDatabaseError,
    claimed,
    record,
    record_async,
    store_for,
)
from idempo.wsgi import IdempotencyMiddleware as WSGIIdempotencyMiddleware
from idempo.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

from .support.processes import store_key
from .support.stores import drop_table

R = TypeVar("R")
Respond = Callable[[int, dict[str, Any]], R]
"""Makes the framework's response from a status and a JSON document."""
Parts = tuple[int, list[tuple[str, str]], bytes]
"""A response as ``record()`` takes it without a framework: status, headers, body."""

BODY = b'{"amount": 1999, "currency": "eur"}'
RECORD_ERRORS = (KeyTakenOverError, NotClaimedError, TransactionError, WrongDatabaseError)
TAKEN_OVER = "taken over"  # in the faces' warning that a response is not stored, its key being another request's now

# The bindings: which face, which driver. psycopg's own faults (a failed transaction) run on the first three only.
PSYCOPG = ("asgi-psycopg-async", "wsgi-psycopg", "flask-psycopg")
SQLITE = ("wsgi-sqlite3", "flask-sqlite3", "asgi-sqlite3")
BINDINGS = (*PSYCOPG, *SQLITE)


class Declined(Exception):
    """The business declines the charge after the response was recorded: its transaction rolls back."""


class AppFailed(Exception):
    """The application fails after the response was recorded, and the exception escapes the handler."""


# -- what the faces did: their store calls (an Observer), and what complete answered ---------------------------------


class Calls:
    """An :class:`~idempo.observe.Observer` that counts the store calls of a face and keeps each request's outcome."""

    def __init__(self) -> None:
        self.store_calls: list[StoreOperation] = []
        self.outcomes: list[Outcome] = []

    def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
        self.outcomes.append(outcome)

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        assert error is None, error
        self.store_calls.append(operation)

    def count(self, operation: StoreOperation) -> int:
        return self.store_calls.count(operation)


class AsyncAnswers(ForwardingStore):
    """An async store, forwarded to as it is, keeping what each ``complete`` answered. The faces find the store's
    database through it (``_inner``)."""

    __slots__ = ("completed",)

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.completed: list[bool] = []

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        done = await super().complete(key, token, payload, ttl=ttl)
        self.completed.append(done)
        return done


class SyncAnswers:
    """:class:`AsyncAnswers` for a sync store."""

    def __init__(self, inner: SyncStore) -> None:
        self._inner = inner
        self.completed: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        done = self._inner.complete(key, token, payload, ttl=ttl)
        self.completed.append(done)
        return done


# -- the handlers: one transaction per driver ----------------------------------------------------------------------


def _take_over(store: SyncStore) -> None:
    """What a retry does once the lease of a request has run out: the key becomes the retry's (another token)."""
    bound = current()
    assert bound is not None
    store.delete(bound.store_key)
    assert isinstance(store.claim(bound.store_key, "a retry", lease=60, ttl=600), Acquired)


async def _take_over_async(store: Store) -> None:
    bound = current()
    assert bound is not None
    await store.delete(bound.store_key)
    assert isinstance(await store.claim(bound.store_key, "a retry", lease=60, ttl=600), Acquired)


def _insert_pg(ledger: str) -> sql.Composed:
    return sql.SQL("INSERT INTO {} (name) VALUES (%s) RETURNING id").format(sql.Identifier(ledger))


def _fail_the_transaction(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")


@contextlib.contextmanager
def _psycopg_target(conn: psycopg.Connection[Any], conninfo: str, fault: str) -> Iterator[psycopg.Connection[Any]]:
    """The connection to record on: the handler's, or for a fault, one outside a transaction or on another
    database."""
    if fault == "autocommit":
        with psycopg.connect(conninfo, autocommit=True) as other:
            yield other
    elif fault == "other-db":
        with psycopg.connect(make_conninfo(conninfo, dbname="postgres")) as other:
            yield other
    else:
        yield conn


def charge_psycopg(
    pool: ConnectionPool[Any],
    conninfo: str,
    ledger: str,
    name: str,
    fault: str,
    respond: Respond[R],
    *,
    explicit: bool,
) -> R:
    """The handler's work on a sync psycopg pool. *explicit*: in ``conn.transaction()``; else in the transaction
    psycopg opens implicitly (not autocommit), which ``pool.connection()`` commits at the end of its block."""
    try:
        with pool.connection() as conn, conn.transaction() if explicit else contextlib.nullcontext():
            row = conn.execute(_insert_pg(ledger), (name,)).fetchone()
            assert row is not None
            response = respond(201, {"charged": name, "id": row[0]})
            if fault == "in-error":
                _fail_the_transaction(conn)
            with _psycopg_target(conn, conninfo, fault) as target:
                record(target, response)
            if fault == "rollback":
                raise Declined
            if fault == "raise":
                raise AppFailed
    except Declined:
        return respond(402, {"declined": name})
    except RECORD_ERRORS as exc:
        return respond(422, {"error": type(exc).__name__})
    return response


@contextlib.asynccontextmanager
async def _psycopg_target_async(
    conn: psycopg.AsyncConnection[Any], conninfo: str, fault: str
) -> AsyncIterator[psycopg.AsyncConnection[Any] | psycopg.Connection[Any]]:
    if fault == "sync-connection":  # record_async() on a blocking connection
        with psycopg.connect(conninfo) as blocking:
            yield blocking
    elif fault == "autocommit":
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as other:
            yield other
    elif fault == "other-db":
        async with await psycopg.AsyncConnection.connect(make_conninfo(conninfo, dbname="postgres")) as other:
            yield other
    else:
        yield conn


async def charge_psycopg_async(
    pool: AsyncConnectionPool[Any], conninfo: str, ledger: str, name: str, fault: str, respond: Respond[R]
) -> R:
    """The handler's work on an async psycopg pool, in ``conn.transaction()``."""
    try:
        async with pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(_insert_pg(ledger), (name,))
            row = await cursor.fetchone()
            assert row is not None
            response = respond(201, {"charged": name, "id": row[0]})
            if fault == "in-error":
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    await conn.execute("SELECT 1 / 0")
            async with _psycopg_target_async(conn, conninfo, fault) as target:
                if fault == "sync-record":  # record() on an async connection
                    record(target, response)
                else:
                    await record_async(target, response)
            if fault == "rollback":
                raise Declined
            if fault == "raise":
                raise AppFailed
    except Declined:
        return respond(402, {"declined": name})
    except (*RECORD_ERRORS, TypeError) as exc:
        return respond(422, {"error": type(exc).__name__, "detail": str(exc)})
    return response


@contextlib.contextmanager
def _sqlite_target(conn: sqlite3.Connection, path: Path, fault: str) -> Iterator[sqlite3.Connection]:
    if fault == "autocommit":  # isolation_level=None: sqlite3 opens no transaction by itself
        target = sqlite3.connect(path, isolation_level=None)
    elif fault == "other-db":
        target = sqlite3.connect(path.with_name("other.db"))
    else:
        yield conn
        return
    try:
        yield target
    finally:
        target.close()


def charge_sqlite(path: Path, name: str, fault: str, respond: Respond[R]) -> R:
    """The handler's work on a SQLite file: a connection of the request's own, ``with conn:`` (the transaction
    sqlite3 opens implicitly before the INSERT, committed at the end of the block)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        with conn:
            row_id = conn.execute("INSERT INTO ledger (name) VALUES (?)", (name,)).lastrowid
            response = respond(201, {"charged": name, "id": row_id})
            with _sqlite_target(conn, path, fault) as target:
                record(target, response)
            if fault == "rollback":
                raise Declined
            if fault == "raise":
                raise AppFailed
    except Declined:
        return respond(402, {"declined": name})
    except RECORD_ERRORS as exc:
        return respond(422, {"error": type(exc).__name__})
    finally:
        conn.close()
    return response


# -- the faces --------------------------------------------------------------------------------------------------------


def parts(status: int, document: dict[str, Any]) -> Parts:
    return status, [("Content-Type", "application/json")], json.dumps(document).encode()


def flask_response(status: int, document: dict[str, Any]) -> flask.Response:
    response = flask.jsonify(document)
    response.status_code = status
    return response


def starlette_response(status: int, document: dict[str, Any]) -> JSONResponse:
    return JSONResponse(document, status_code=status)


def wsgi_app(charge: Callable[[str, str], Parts], take_over: Callable[[], None]) -> WSGIApplication:
    """A plain WSGI application: ``POST /charge/<name>``, its response a ``(status, headers, body)`` tuple."""

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        name = environ["PATH_INFO"].rpartition("/")[2]
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        fault = environ.get("HTTP_X_FAULT", "")
        if fault == "taken-over":
            take_over()
        status, headers, body = charge(name, fault)
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    return application


def server_errors(app: WSGIApplication) -> WSGIApplication:
    """What a WSGI server does with an exception escaping the application: a 500."""

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except AppFailed:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"failed"]

    return application


def flask_app(charge: Callable[[str, str], flask.Response], take_over: Callable[[], None]) -> flask.Flask:
    app = flask.Flask(f"tx-{uuid.uuid4().hex}")

    @app.post("/charge/<name>")
    def view(name: str) -> flask.Response:
        fault = flask.request.headers.get("X-Fault", "")
        if fault == "taken-over":
            take_over()
        return charge(name, fault)

    return app


def starlette_app(charge: Callable[[str, str], Awaitable[JSONResponse]], take_over: Store) -> Starlette:
    async def endpoint(request: Request) -> JSONResponse:
        fault = request.headers.get("x-fault", "")
        if fault == "taken-over":
            await _take_over_async(take_over)
        return await charge(request.path_params["name"], fault)

    return Starlette(routes=[Route("/charge/{name}", endpoint, methods=["POST"])])


# -- a binding: an application, its ledger, its store --------------------------------------------------------------


@dataclass
class Binding:
    """One application as the tests drive it."""

    name: str
    client: httpx.AsyncClient | httpx.Client
    rows: Callable[[], int]
    store: Store | SyncStore
    calls: Calls
    answers: list[bool]
    """What each ``complete`` of the face answered."""

    async def post(self, name: str, key: str | None, fault: str = "") -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if fault:
            headers["X-Fault"] = fault
        if isinstance(self.client, httpx.AsyncClient):
            return await self.client.post(f"/charge/{name}", content=BODY, headers=headers)
        return self.client.post(f"/charge/{name}", content=BODY, headers=headers)

    async def get(self, key: str) -> Record | None:
        result = self.store.get(store_key(key))
        if isinstance(result, Awaitable):
            record: Record | None = await result
            return record
        return result


def _pg_rows(conninfo: str, ledger: str) -> Callable[[], int]:
    def rows() -> int:
        with psycopg.connect(conninfo) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(ledger))).fetchone()
        assert row is not None
        return int(row[0])

    return rows


def _sqlite_rows(path: Path) -> Callable[[], int]:
    def rows() -> int:
        conn = sqlite3.connect(path)
        try:
            (count,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
        finally:
            conn.close()
        return int(count)

    return rows


@contextlib.contextmanager
def _pg_ledger(conninfo: str) -> Iterator[str]:
    ledger = f"ledger_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, name text NOT NULL)").format(sql.Identifier(ledger))
        )
    try:
        yield ledger
    finally:
        drop_table(conninfo, ledger)


@contextlib.asynccontextmanager
async def _asgi_binding(
    kind: str, store: Store, rows: Callable[[], int], charge: Callable[[str, str], Awaitable[JSONResponse]]
) -> AsyncIterator[Binding]:
    """A Starlette application behind the ASGI middleware, on *store* (which the test also reads)."""
    calls, answers = Calls(), AsyncAnswers(store)
    app = starlette_app(charge, store)
    app.add_middleware(IdempotencyMiddleware, store=answers, observer=calls)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # Starlette's 500, as a server sends it
    async with httpx.AsyncClient(transport=transport, base_url="http://tx") as client:
        yield Binding(kind, client, rows, store, calls, answers.completed)


@contextlib.contextmanager
def _wsgi_binding(
    kind: str,
    store: SyncStore,
    rows: Callable[[], int],
    charge_wsgi: Callable[[str, str], Parts],
    charge_flask: Callable[[str, str], flask.Response],
) -> Iterator[Binding]:
    """A plain WSGI application behind the WSGI middleware, or a Flask one behind the extension, on *store*."""
    calls, answers = Calls(), SyncAnswers(store)

    def take_over() -> None:
        _take_over(store)

    app: WSGIApplication
    if kind.startswith("wsgi"):
        app = server_errors(WSGIIdempotencyMiddleware(wsgi_app(charge_wsgi, take_over), store=answers, observer=calls))
    else:
        application = flask_app(charge_flask, take_over)
        Idempotency(application, store=answers, observer=calls)
        app = application
    with httpx.Client(transport=httpx.WSGITransport(app), base_url="http://tx") as client:
        yield Binding(kind, client, rows, store, calls, answers.completed)


@contextlib.asynccontextmanager
async def _psycopg_binding(kind: str, conninfo: str, table: str) -> AsyncIterator[Binding]:
    with _pg_ledger(conninfo) as ledger:
        rows = _pg_rows(conninfo, ledger)
        if kind == "asgi-psycopg-async":
            apool: AsyncConnectionPool[Any] = AsyncConnectionPool(conninfo, min_size=1, max_size=4, open=False)
            await apool.open(wait=True)
            astore = store_for(apool, table=table)
            assert isinstance(astore, PostgresStore)

            async def charge_async(name: str, fault: str) -> JSONResponse:
                return await charge_psycopg_async(apool, conninfo, ledger, name, fault, starlette_response)

            try:
                async with _asgi_binding(kind, astore, rows, charge_async) as made:
                    yield made
            finally:
                await astore.close()
                await apool.close()
            return
        pool: ConnectionPool[Any] = ConnectionPool(conninfo, min_size=1, max_size=4, open=False)
        pool.open(wait=True)
        store = store_for(pool, table=table)
        assert isinstance(store, SyncPostgresStore)
        try:
            with _wsgi_binding(
                kind,
                store,
                rows,
                lambda name, fault: charge_psycopg(pool, conninfo, ledger, name, fault, parts, explicit=True),
                lambda name, fault: charge_psycopg(pool, conninfo, ledger, name, fault, flask_response, explicit=False),
            ) as made:
                yield made
        finally:
            store.close()
            pool.close()


@contextlib.asynccontextmanager
async def _sqlite_binding(kind: str, directory: Path) -> AsyncIterator[Binding]:
    path = directory / "app.db"
    conn = sqlite3.connect(path)
    rows = _sqlite_rows(path)
    try:
        conn.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        if kind == "asgi-sqlite3":
            astore = store_for(conn, sync=False)
            assert isinstance(astore, SQLiteStore)

            async def charge_async(name: str, fault: str) -> JSONResponse:
                return charge_sqlite(path, name, fault, starlette_response)

            try:
                async with _asgi_binding(kind, astore, rows, charge_async) as made:
                    yield made
            finally:
                await astore.close()
            return
        store = store_for(conn)
        assert isinstance(store, SyncSQLiteStore)
        try:
            with _wsgi_binding(
                kind,
                store,
                rows,
                lambda name, fault: charge_sqlite(path, name, fault, parts),
                lambda name, fault: charge_sqlite(path, name, fault, flask_response),
            ) as made:
                yield made
        finally:
            store.close()
    finally:
        conn.close()


@pytest.fixture(params=BINDINGS)
async def binding(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Binding]:
    kind: str = request.param
    if kind in PSYCOPG:
        opened = _psycopg_binding(kind, request.getfixturevalue("postgres_url"), request.getfixturevalue("table"))
    else:
        opened = _sqlite_binding(kind, tmp_path)
    async with opened as made:
        yield made


def _warned_taken_over(caplog: pytest.LogCaptureFixture) -> bool:
    return any(TAKEN_OVER in entry.getMessage() for entry in caplog.records if entry.levelno >= logging.WARNING)


def new_key() -> str:
    return str(uuid.uuid4())


# -- the tests --------------------------------------------------------------------------------------------------------


async def test_a_response_recorded_in_the_transaction_is_replayed_and_the_face_writes_nothing_more(
    binding: Binding, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    first = await binding.post("a", key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert first.json()["charged"] == "a"
    assert binding.rows() == 1
    # The face still calls complete (it cannot see psycopg's or sqlite3's commit): the key is completed already,
    # so the answer is False, and that is the commit, not a lost key.
    assert binding.calls.count("complete") == 1
    assert binding.answers == [False]
    assert not _warned_taken_over(caplog)
    stored = await binding.get(key)
    assert stored is not None
    assert stored.state is State.COMPLETED

    retry = await binding.post("a", key)
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert binding.rows() == 1
    assert binding.calls.count("complete") == 1
    assert binding.calls.outcomes == ["executed", "replayed"]


async def test_a_key_taken_over_before_record_rolls_the_business_rows_back(
    binding: Binding, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    response = await binding.post("a", key, fault="taken-over")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "KeyTakenOverError"  # raised inside the transaction, which rolled back
    assert binding.rows() == 0
    stored = await binding.get(key)
    assert stored is not None
    assert stored.state is State.IN_PROGRESS  # the retry's claim, untouched
    assert stored.fingerprint == "a retry"
    # The face's own completion finds the key another's too: the response is not stored, and it says so.
    assert binding.answers == [False]
    assert _warned_taken_over(caplog)


async def test_a_transaction_rolled_back_after_record_leaves_the_key_to_the_response_sent(
    binding: Binding, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    declined = await binding.post("a", key, fault="rollback")
    assert declined.status_code == 402, declined.text
    assert binding.rows() == 0
    # What record() wrote rolled back with the ledger row: the face completes the key with the 402 it sent.
    assert binding.calls.count("complete") == 1
    assert binding.answers == [True]
    assert not _warned_taken_over(caplog)

    retry = await binding.post("a", key)
    assert retry.status_code == 402
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == declined.content
    assert binding.rows() == 0


async def test_an_exception_after_record_releases_the_key_and_the_retry_runs_once(binding: Binding) -> None:
    key = new_key()
    failed = await binding.post("a", key, fault="raise")
    assert failed.status_code == 500
    assert binding.rows() == 0
    assert binding.calls.count("release") == 1
    assert binding.calls.count("complete") == 0
    assert await binding.get(key) is None

    retry = await binding.post("a", key)
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers
    assert binding.rows() == 1
    assert binding.answers == [False]  # the retry's transaction completed the key


async def test_a_connection_outside_a_transaction_is_refused(binding: Binding) -> None:
    """psycopg in autocommit mode, sqlite3 with ``isolation_level=None``: the record would commit on its own."""
    key = new_key()
    response = await binding.post("a", key, fault="autocommit")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "TransactionError"
    assert binding.rows() == 0
    assert binding.answers == [True]  # nothing was recorded: the face completes the key with the 422


async def test_a_connection_to_another_database_is_refused(binding: Binding) -> None:
    """psycopg: the server's ``postgres`` database; sqlite3: another file."""
    key = new_key()
    response = await binding.post("a", key, fault="other-db")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "WrongDatabaseError"
    assert binding.rows() == 0
    assert binding.answers == [True]


@pytest.mark.parametrize("binding", PSYCOPG, indirect=True)
async def test_a_failed_psycopg_transaction_is_refused(binding: Binding) -> None:
    key = new_key()
    response = await binding.post("a", key, fault="in-error")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "TransactionError"
    assert binding.rows() == 0
    assert binding.answers == [True]


@pytest.mark.parametrize(
    ("binding", "fault", "hint"),
    [
        pytest.param("asgi-psycopg-async", "sync-record", "use record_async", id="record-on-async"),
        pytest.param("asgi-psycopg-async", "sync-connection", "use record for", id="record_async-on-sync"),
    ],
    indirect=["binding"],
)
async def test_record_and_record_async_refuse_the_other_kind_of_psycopg_connection(
    binding: Binding, fault: str, hint: str
) -> None:
    """Before any statement runs (and without an un-awaited coroutine, which the warnings filter would fail)."""
    response = await binding.post("a", new_key(), fault=fault)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "TypeError"
    assert hint in response.json()["detail"]
    assert binding.rows() == 0
    assert binding.answers == [True]


async def test_record_in_a_request_without_a_key_is_not_claimed(binding: Binding) -> None:
    response = await binding.post("a", None)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "NotClaimedError"
    assert binding.rows() == 0
    assert binding.calls.store_calls == []
    assert binding.calls.outcomes == ["passthrough"]


def test_the_completion_prepared_by_psycopg_on_the_apps_connection_still_records(postgres_url: str, table: str) -> None:
    """psycopg prepares a statement run five times on a connection (prepare_threshold): the pool's one connection
    prepares the completion, and the keyed requests after that are recorded and replayed as the first ones."""
    pool: ConnectionPool[Any] = ConnectionPool(postgres_url, min_size=1, max_size=1, open=False)
    pool.open(wait=True)
    store = store_for(pool, table=table)
    assert isinstance(store, SyncPostgresStore)
    calls, answers = Calls(), SyncAnswers(store)

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        response = parts(201, {"charged": environ["PATH_INFO"]})
        with pool.connection() as conn, conn.transaction():
            record(conn, response)
        start_response("201 Created", response[1])
        return [response[2]]

    app = WSGIIdempotencyMiddleware(application, store=answers, observer=calls)
    try:
        with httpx.Client(transport=httpx.WSGITransport(app), base_url="http://tx") as client:
            firsts = [client.post(f"/charge/{n}", headers={"Idempotency-Key": f"k{n}"}) for n in range(8)]
            retries = [client.post(f"/charge/{n}", headers={"Idempotency-Key": f"k{n}"}) for n in range(8)]
        with pool.connection() as conn:
            prepared = [row[0] for row in conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()]
    finally:
        store.close()
        pool.close()
    assert [response.status_code for response in firsts] == [201] * 8
    assert [retry.headers.get("idempotent-replayed") for retry in retries] == ["true"] * 8
    assert [retry.content for retry in retries] == [first.content for first in firsts]
    assert answers.completed == [False] * 8  # each one completed by the app's transaction
    assert any(statement.startswith(f'UPDATE "{table}" SET state') for statement in prepared), prepared


def test_record_outside_any_request_is_not_claimed(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    try:
        assert not claimed()
        with pytest.raises(NotClaimedError, match="no keyed request"), conn:
            record(conn, (201, [], b"{}"))
    finally:
        conn.close()


async def test_record_async_outside_any_request_is_not_claimed(postgres_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn, conn.transaction():
        with pytest.raises(NotClaimedError):
            await record_async(conn, (201, [], b"{}"))


# -- store_for on the drivers' objects ------------------------------------------------------------------------------


async def test_store_for_a_psycopg_pool_is_a_postgres_store_of_its_kind(postgres_url: str, table: str) -> None:
    pool: ConnectionPool[Any] = ConnectionPool(postgres_url, open=False)
    apool: AsyncConnectionPool[Any] = AsyncConnectionPool(postgres_url, open=False)
    made = [
        store_for(pool, table=table),
        store_for(pool, sync=False, table=table),
        store_for(apool, table=table),
        store_for(apool, sync=True, table=table),
    ]
    kinds: list[type] = [type(store) for store in made]
    assert kinds == [SyncPostgresStore, PostgresStore, PostgresStore, SyncPostgresStore]
    for store in made:
        result = store.close()
        if isinstance(result, Awaitable):
            await result


def test_store_for_a_psycopg_pool_connects_where_the_pool_does(postgres_url: str, table: str) -> None:
    """The pool's kwargs that say where it connects count (its dbname here), the others (autocommit) do not."""
    params = conninfo_to_dict(postgres_url)
    dbname = params.pop("dbname")
    pool: ConnectionPool[Any] = ConnectionPool(
        make_conninfo("", **params), kwargs={"dbname": dbname, "autocommit": True}, min_size=1, open=False
    )
    pool.open(wait=True)
    store = store_for(pool, table=table)
    try:
        target = transaction_target(store)
        assert target is not None
        with pool.connection() as conn:
            assert target.identity[2] == conn.info.dbname == dbname
        assert store.get("a key") is None  # the store's own connections: same database, its table made there
    finally:
        store.close()
        pool.close()


def test_store_for_a_psycopg_pool_with_a_callable_conninfo_is_refused(postgres_url: str) -> None:
    pool: ConnectionPool[Any] = ConnectionPool(lambda: postgres_url, open=False)
    with pytest.raises(ConfigurationError, match="callable"):
        store_for(pool)


def test_store_for_a_sqlite3_connection_is_a_store_on_its_file(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    memory = sqlite3.connect(":memory:")
    try:
        sync, asynchronous = store_for(conn), store_for(conn, sync=False, table="records")
        assert isinstance(sync, SyncSQLiteStore)
        assert isinstance(asynchronous, SQLiteStore)
        assert repr(asynchronous) == f"SQLiteStore({str(tmp_path / 'app.db')!r}, table='records')"
        sync.close()
        with pytest.raises(ConfigurationError, match="in-memory"):
            store_for(memory)
    finally:
        conn.close()
        memory.close()
