"""The FastAPI application of ``tests/e2e/test_transactions_uvicorn.py``, served by ``uvicorn --factory
tests.e2e.tx_sqlalchemy_app:create_app`` (see ``tests.support.uvicorn``): ``POST /charge/<name>`` inserts a ledger row
and answers 201, in one SQLAlchemy transaction, behind the idempotency middleware on a store in the same database
(``idempo.transactions.store_for``).

Configured by environment variables, read in each worker process:

- ``TX_E2E_DATABASE``: the SQLAlchemy URL of the database (``sqlite:////<path>``, ``postgresql+psycopg://...``);
- ``TX_E2E_SESSION``: ``sync`` (a ``Session`` in a ``def`` handler, in FastAPI's thread pool) or ``async`` (an
  ``AsyncSession``: ``sqlite+aiosqlite``, ``postgresql+psycopg``);
- ``TX_E2E_MODE``: ``bound`` (the handler records its response inside the transaction, with
  ``idempo.transactions.record``) or ``plain`` (it commits, then returns: the middleware records the response
  afterwards, as every idempotency middleware does);
- ``TX_E2E_TABLE``: the store's table; ``TX_E2E_LEDGER``: the ledger's (:func:`ledger_table`, made by the test);
- ``TX_E2E_LEASE``: the middleware's lease, in seconds;
- ``TX_E2E_DIR``: a directory the test and the workers share.

Fault hook, by request header: ``X-Fault: after-commit`` SIGKILLs the worker right after the transaction committed,
before the handler returns; ``X-Fault: before-commit`` SIGKILLs it inside the transaction, after the ledger insert
(and, bound, after the record), before the commit. Before dying, the worker appends its pid to ``<name>.killed``.

``POST /charge/<name>`` waits, before its transaction begins, while the file ``<name>.hold`` exists (so that a test
keeps the first execution running while other requests under its key arrive). Every response carries
``X-Worker-Pid``, added outside the idempotency middleware; the 201's body names the ledger row and the pid of the
process that inserted it, so that a replay can be matched to the ledger.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from idempo import IdempotencyMiddleware, Store
from idempo.asgi import ASGIApp, Message, Receive, Scope, Send
from idempo.transactions import claimed, record, record_async, store_for
from tests.support.uvicorn import mark_ready

__all__ = ["ledger_rows", "create_app", "ledger_table"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
_HOLD_LIMIT = 60.0  # a charge never holds longer than this, so that no worker hangs if a test forgets
_POLL = 0.01


def ledger_table(name: str) -> Table:
    """The business table: one row per charge that ran (and committed)."""
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String(100), nullable=False, index=True),
        Column("pid", Integer, nullable=False),
    )


def ledger_rows(engine: Engine, ledger: str, name: str) -> list[tuple[int, int]]:
    """The ``(id, pid)`` of the ledger rows of the charge *name*, in order."""
    table = ledger_table(ledger)
    with engine.connect() as connection:
        rows = connection.execute(select(table.c.id, table.c.pid).where(table.c.name == name).order_by(table.c.id))
        return [(int(row.id), int(row.pid)) for row in rows]


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def _die(side_dir: Path, name: str) -> None:
    _append(side_dir / f"{name}.killed", str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def _async_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


class _StampPid:
    """Outermost layer: every response says which worker answered it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", self.pid)]}
            await send(message)

        await self.app(scope, receive, send_with_pid if scope["type"] == "http" else send)


def create_app() -> ASGIApp:
    """Build the application from the environment (see the module's docstring)."""
    url = os.environ["TX_E2E_DATABASE"]
    asynchronous = os.environ["TX_E2E_SESSION"] == "async"
    bound = os.environ["TX_E2E_MODE"] == "bound"
    ledger = ledger_table(os.environ["TX_E2E_LEDGER"])
    side_dir = Path(os.environ["TX_E2E_DIR"])
    engine: Any = create_async_engine(_async_url(url)) if asynchronous else create_engine(url)
    store = cast("Store", store_for(engine, sync=False, table=os.environ["TX_E2E_TABLE"]))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        mark_ready()
        yield
        await store.close()
        if asynchronous:
            await engine.dispose()
        else:
            engine.dispose()

    api = FastAPI(lifespan=lifespan)

    @api.get("/health")
    async def health() -> dict[str, int]:
        return {"pid": os.getpid()}

    def _response(name: str, row: int) -> JSONResponse:
        return JSONResponse({"name": name, "row": row, "pid": os.getpid()}, status_code=201)

    def charge(name: str, request: Request) -> Response:
        if not _NAME.fullmatch(name):
            return JSONResponse({"detail": "bad name"}, status_code=404)
        fault = request.headers.get("x-fault")
        hold, deadline = side_dir / f"{name}.hold", time.monotonic() + _HOLD_LIMIT
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(_POLL)  # released by another process: there is no event to wait on
        with Session(engine) as session:
            with session.begin():
                statement = insert(ledger).values(name=name, pid=os.getpid()).returning(ledger.c.id)
                response = _response(name, session.execute(statement).scalar_one())
                if bound and claimed():
                    record(session, response)
                if fault == "before-commit":
                    _die(side_dir, name)
            if fault == "after-commit":
                _die(side_dir, name)
        return response

    async def charge_async(name: str, request: Request) -> Response:
        if not _NAME.fullmatch(name):
            return JSONResponse({"detail": "bad name"}, status_code=404)
        fault = request.headers.get("x-fault")
        hold, deadline = side_dir / f"{name}.hold", time.monotonic() + _HOLD_LIMIT
        while hold.exists() and time.monotonic() < deadline:  # noqa: ASYNC110 - released by another process
            await asyncio.sleep(_POLL)
        async with AsyncSession(engine) as session:
            async with session.begin():
                statement = insert(ledger).values(name=name, pid=os.getpid()).returning(ledger.c.id)
                response = _response(name, (await session.execute(statement)).scalar_one())
                if bound and claimed():
                    await record_async(session, response)
                if fault == "before-commit":
                    _die(side_dir, name)
            if fault == "after-commit":
                _die(side_dir, name)
        return response

    api.add_api_route("/charge/{name}", charge_async if asynchronous else charge, methods=["POST"])
    lease = float(os.environ.get("TX_E2E_LEASE", "2"))
    return _StampPid(IdempotencyMiddleware(api, store=store, lease=lease))
