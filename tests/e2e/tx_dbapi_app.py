"""The applications the crash tests of :mod:`idempo.transactions` serve on the DB-API drivers: a WSGI one for
gunicorn (``tests.e2e.tx_dbapi_app:create_app()``: sync psycopg on PostgreSQL, or sqlite3 on a SQLite file) and an
ASGI one for uvicorn (``tests.e2e.tx_dbapi_app:create_asgi_app``, a factory: async psycopg on PostgreSQL). Each keeps
its idempotency records in the application's own database (``store_for`` the pool or the connection).

Configured by environment variables, read when the server builds the application (in each gunicorn worker):

- ``TX_E2E_DATABASE``: a PostgreSQL URL, or the path of a SQLite file.
- ``TX_E2E_TABLE``: the store's table (default ``idempo_records``).
- ``TX_E2E_LEDGER``: the ledger table, which the test creates: ``(id, name, idem_key, pid)``.
- ``TX_E2E_MODE``: ``bound``, the handler records the response in its transaction (``record()``); ``plain``, it
  does not (the middleware completes the key after the response, as without idempo.transactions).
- ``TX_E2E_LEASE``: the middleware's lease, in seconds (default 2).
- ``TX_E2E_DIR``: a directory the test and the workers share, for the gate below (WSGI only).

Routes: ``GET /health`` (200); ``POST /charge/<name>``: in one transaction, insert a ledger row, then (bound) record
the ``201`` response ``{"id", "name", "pid", "key"}``, then commit, and answer it. The request header ``X-Fault``
kills the worker with SIGKILL: ``before-commit`` inside the transaction (after the insert and the record), or
``after-commit`` once the transaction committed (before the response is sent, so the client never gets it).
``X-Hold: <tag>`` (WSGI only) is a gate inside the transaction, after the record: the worker appends its pid to
``<tag>.started`` in the shared directory, then waits while the file ``<tag>.hold`` exists there (a minute at most).
Every WSGI response carries ``X-Worker-Pid`` (added outside the middleware: 409s and replays too).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import IdempotencyMiddleware
from idempo.asgi import ASGIApp
from idempo.stores.postgres import PostgresStore
from idempo.transactions import record, record_async, store_for
from idempo.wsgi import KEY_ENVIRON, StartResponse, WSGIApplication, WSGIEnvironment
from idempo.wsgi import IdempotencyMiddleware as WSGIIdempotencyMiddleware

if TYPE_CHECKING:
    from _typeshed import OptExcInfo

__all__ = ["create_app", "create_asgi_app"]

Parts = tuple[int, list[tuple[str, str]], bytes]

_TAG = re.compile(r"[A-Za-z0-9_-]{1,100}")
_HOLD_LIMIT = 60.0  # a gate never holds longer, so that no worker hangs if a test forgets it


@dataclass(frozen=True)
class Config:
    database: str
    table: str
    ledger: str
    bound: bool
    lease: float

    @classmethod
    def from_environment(cls) -> Config:
        mode = os.environ["TX_E2E_MODE"]
        if mode not in ("bound", "plain"):
            raise ValueError(f"TX_E2E_MODE must be bound or plain, not {mode!r}")
        return cls(
            os.environ["TX_E2E_DATABASE"],
            os.environ.get("TX_E2E_TABLE", "idempo_records"),
            os.environ["TX_E2E_LEDGER"],
            mode == "bound",
            float(os.environ.get("TX_E2E_LEASE", "2")),
        )

    @property
    def postgres(self) -> bool:
        return self.database.startswith(("postgresql:", "postgres:"))


def _fault(when: str, fault: str) -> None:
    """Die here, as an OOM kill or a lost node would: no exception, no cleanup, no response."""
    if fault == when:
        os.kill(os.getpid(), signal.SIGKILL)


def _hold(tag: str) -> None:
    """The gate: say this worker is here, then wait while the test holds the file."""
    directory = os.environ.get("TX_E2E_DIR")
    if not directory or not _TAG.fullmatch(tag):
        return
    fd = os.open(Path(directory) / f"{tag}.started", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())  # one short write on O_APPEND: atomic between processes
    finally:
        os.close(fd)
    hold, deadline = Path(directory) / f"{tag}.hold", time.monotonic() + _HOLD_LIMIT
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # released by the test, another process: there is nothing to wait on but the file


def _document(row_id: int, name: str, key: str | None) -> bytes:
    return json.dumps({"id": row_id, "name": name, "pid": os.getpid(), "key": key}).encode()


def _insert(ledger: str) -> sql.Composed:
    return sql.SQL("INSERT INTO {} (name, idem_key, pid) VALUES (%s, %s, %s) RETURNING id").format(
        sql.Identifier(ledger)
    )


# -- WSGI (gunicorn): sync psycopg or sqlite3 ----------------------------------------------------------------------


def _charge_postgres(
    pool: ConnectionPool[Any], config: Config, name: str, key: str | None, fault: str, tag: str
) -> Parts:
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(_insert(config.ledger), (name, key, os.getpid())).fetchone()
        assert row is not None
        response: Parts = (201, [("Content-Type", "application/json")], _document(row[0], name, key))
        if config.bound:
            record(conn, response)
        _hold(tag)
        _fault("before-commit", fault)
    _fault("after-commit", fault)
    return response


def _charge_sqlite(config: Config, name: str, key: str | None, fault: str, tag: str) -> Parts:
    conn = sqlite3.connect(config.database, timeout=30)
    try:
        with conn:  # sqlite3's implicit transaction, begun before the INSERT, committed at the end of the block
            cursor = conn.execute(
                f'INSERT INTO "{config.ledger}" (name, idem_key, pid) VALUES (?, ?, ?)', (name, key, os.getpid())
            )
            assert cursor.lastrowid is not None
            response: Parts = (201, [("Content-Type", "application/json")], _document(cursor.lastrowid, name, key))
            if config.bound:
                record(conn, response)
            _hold(tag)
            _fault("before-commit", fault)
    finally:
        conn.close()
    _fault("after-commit", fault)
    return response


def create_app() -> WSGIApplication:
    """The WSGI application (see the module's docstring), built in each gunicorn worker."""
    config = Config.from_environment()
    if config.postgres:
        pool: ConnectionPool[Any] = ConnectionPool(config.database, min_size=1, max_size=2, open=True)
        store = store_for(pool, table=config.table)

        def charge(name: str, key: str | None, fault: str, tag: str) -> Parts:
            return _charge_postgres(pool, config, name, key, fault, tag)

    else:
        conn = sqlite3.connect(config.database)
        try:
            store = store_for(conn, table=config.table)
        finally:
            conn.close()

        def charge(name: str, key: str | None, fault: str, tag: str) -> Parts:
            return _charge_sqlite(config, name, key, fault, tag)

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        if path == "/health" and method == "GET":
            status, headers, body = 200, [("Content-Type", "application/json")], b'{"ok": true}'
        elif path.startswith("/charge/") and method == "POST":
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            name = path.removeprefix("/charge/")
            key, fault, tag = environ.get(KEY_ENVIRON), environ.get("HTTP_X_FAULT", ""), environ.get("HTTP_X_HOLD", "")
            status, headers, body = charge(name, key, fault, tag)
        else:
            status, headers, body = 404, [("Content-Type", "text/plain")], b"no such route"
        start_response(f"{status} {HTTPStatus(status).phrase}", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    protected = WSGIIdempotencyMiddleware(application, store=store, lease=config.lease, on_conflict="reject")

    def with_pid(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        pid = str(os.getpid())

        def start(status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None) -> Any:
            return start_response(status, [*headers, ("X-Worker-Pid", pid)], exc_info)

        return protected(environ, start)

    return with_pid


# -- ASGI (uvicorn): async psycopg ------------------------------------------------------------------------------------


def create_asgi_app() -> ASGIApp:
    """The ASGI application (see the module's docstring): a factory, for ``uvicorn --factory``."""
    config = Config.from_environment()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(config.database, min_size=1, max_size=4, open=False)
    store = store_for(pool, table=config.table)
    assert isinstance(store, PostgresStore)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.open(wait=True)
        try:
            yield
        finally:
            await store.close()
            await pool.close()

    async def charge(request: Request) -> Response:
        name = request.path_params["name"]
        key = request.headers.get("idempotency-key")
        fault = request.headers.get("x-fault", "")
        async with pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(_insert(config.ledger), (name, key, os.getpid()))
            row = await cursor.fetchone()
            assert row is not None
            response = Response(_document(row[0], name, key), status_code=201, media_type="application/json")
            if config.bound:
                await record_async(conn, response)
            _fault("before-commit", fault)
        _fault("after-commit", fault)
        return response

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    routes = [Route("/health", health, methods=["GET"]), Route("/charge/{name}", charge, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    return IdempotencyMiddleware(app, store=store, lease=config.lease, on_conflict="reject")
