"""idempo.transactions with SQLAlchemy 2 under FastAPI, in process (httpx's ASGITransport): a handler inserts a
ledger row and records its response in the same transaction, on SQLite (a file) and PostgreSQL, through a sync
``Session``, a ``Connection`` (``engine.begin()``), an ``AsyncSession`` and an ``AsyncConnection``.

- recorded in the transaction, the response is replayed byte for byte; with a session (whose commit the binding
  sees) the middleware makes no store call at completion, with a connection one ``complete`` (and logs no "taken
  over" warning when it finds the key completed already);
- a transaction that rolls back after ``record()`` leaves nothing: no row, the key released, a retry runs;
- a key taken over before ``record()`` raises ``KeyTakenOverError`` inside the transaction, and the row rolls back;
  on PostgreSQL a takeover tried after ``record()`` waits for the record's row lock, and then finds the key completed;
- without a key ``record()`` raises ``NotClaimedError``; a store that is not on the transaction's database (memory,
  Redis, another file or database) ``WrongDatabaseError``; a streaming response ``TypeError``; a 5xx is not recorded
  (``False``), and the middleware releases the key as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio.from_thread
import httpx
import psycopg
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import Column, Connection, Engine, Integer, MetaData, String, Table, create_engine, func, insert, select
from sqlalchemy import text as sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from idempo import (
    Acquired,
    IdempotencyMiddleware,
    KeyTakenOverError,
    MemoryStore,
    NotClaimedError,
    State,
    Store,
    WrongDatabaseError,
    store_from_url,
)
from idempo.observe import Outcome, StoreOperation
from idempo.transactions import claimed, record, record_async, store_for
from tests.support.environment import with_options
from tests.support.processes import store_key
from tests.support.stores import FakeClock, drop_table, new_table

KINDS = ("session", "connection", "async-session", "async-connection")
SESSIONS = frozenset({"session", "async-session"})  # the binding sees their commit: no store call at completion
LEASE = 30.0
BODY = b'{"amount": 1999, "currency": "eur"}'
INTRUDER = "intruder-token"


class Boom(Exception):
    """What the handler raises inside its transaction, after record(), to roll it back."""


@dataclass(frozen=True)
class Database:
    """Where the app's transactions run (sync and async URLs of one database), another database, the store's
    options (its table) and the ledger table's name."""

    name: str
    url: str
    async_url: str
    other_url: str
    other_async_url: str
    store_options: dict[str, Any]
    ledger: str


def _sqlite(directory: Path) -> Database:
    app, other = directory / "app.db", directory / "other.db"
    return Database(
        "sqlite",
        f"sqlite:///{app}",
        f"sqlite+aiosqlite:///{app}",
        f"sqlite:///{other}",
        f"sqlite+aiosqlite:///{other}",
        {},
        "ledger",
    )


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        yield _sqlite(tmp_path)
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    table: str = request.getfixturevalue("table")
    url = make_url(postgres_url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    # Another database of the same server, which every cluster has.
    other = make_url(url).set(database="postgres").render_as_string(hide_password=False)
    ledger = new_table()
    try:
        yield Database("postgres", url, url, other, other, {"table": table}, ledger)
    finally:
        drop_table(postgres_url, ledger)


@dataclass
class Calls:
    """An idempo Observer that keeps the names of the middleware's store calls."""

    store_calls: list[str] = field(default_factory=list)

    def on_request(self, outcome: Outcome, scope: Any) -> None:
        pass

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        self.store_calls.append(operation)


class Charges:
    """A FastAPI app whose ``POST /charge/<name>`` inserts a ledger row and records its 201 in the same transaction,
    through one *kind* of SQLAlchemy connection, behind the idempotency middleware. ``X-Mode`` changes what it does:

    - ``ok`` (default): insert, record, commit;
    - ``rollback``: insert, record, then raise :class:`Boom` inside the transaction;
    - ``takeover``: first take the key over (the store's clock moved past the lease, then a claim of the test's
      own), then insert and record (which raises);
    - ``locked``: insert, record, then, still in the transaction, try to take the key over from another connection
      (PostgreSQL: waits for the record's row lock) and commit;
    - ``server-error``: insert, record a 503 (which returns ``False``), commit, answer the 503;
    - ``streaming``: insert, record a streaming response (which raises);
    - ``other-database``: record in a transaction on another database (which raises).

    What the handler saw is kept: ``claimed()`` per request, what ``record()`` returned, what was raised.
    """

    def __init__(self, kind: str, database: Database, *, store: Store | None = None) -> None:
        self.kind = kind
        self.database = database
        self.is_async = kind not in ("session", "connection")
        self.ledger = Table(
            database.ledger, MetaData(), Column("id", Integer, primary_key=True), Column("name", String(100))
        )
        self.sync_engine = create_engine(database.url)
        self.ledger.create(self.sync_engine)
        self.engine: Engine | AsyncEngine = (
            create_async_engine(database.async_url) if self.is_async else self.sync_engine
        )
        self.other: Engine | AsyncEngine = (
            create_async_engine(database.other_async_url) if self.is_async else create_engine(database.other_url)
        )
        self.clock = FakeClock()
        if store is None:
            store = cast("Store", store_for(self.engine, sync=False, clock=self.clock, **database.store_options))
        self.store = store
        self.calls = Calls()
        self.claimed: list[bool] = []
        self.recorded: list[bool] = []
        self.raised: list[BaseException] = []
        self.after_commit: list[State | None] = []  # the key's state once the handler's transaction committed
        self.intruder: asyncio.Task[Any] | None = None
        api = FastAPI()
        if self.is_async:
            api.post("/charge/{name}")(self._charge_async)
        else:
            api.post("/charge/{name}")(self._charge)
        api.add_middleware(IdempotencyMiddleware, store=self.store, observer=self.calls, lease=LEASE)
        self.app = api

    async def close(self) -> None:
        await self.store.close()
        self.sync_engine.dispose()
        for engine in (self.engine, self.other):
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()

    def client(self) -> httpx.AsyncClient:
        # The app's exceptions become 500s (Starlette's ServerErrorMiddleware), as a server would answer.
        transport = httpx.ASGITransport(self.app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30.0)

    def rows(self) -> int:
        with self.sync_engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(self.ledger)).scalar_one())

    # -- the handler, sync (a Session or a Connection, in FastAPI's thread pool) ------------------------------------

    @contextmanager
    def _transaction(self, engine: Engine) -> Iterator[Session | Connection]:
        if self.kind == "session":
            with Session(engine) as session, session.begin():
                yield session
        else:
            with engine.begin() as connection:
                yield connection

    def _charge(self, name: str, request: Request) -> Response:
        mode = request.headers.get("x-mode", "ok")
        self.claimed.append(claimed())
        try:
            if mode == "takeover":
                anyio.from_thread.run(self._take_over, request)
            if mode == "other-database":
                with self._transaction(cast("Engine", self.other)) as other:
                    other.execute(sql("SELECT 1"))
                    record(other, self._response(mode, name, 0))
            with self._transaction(cast("Engine", self.engine)) as connection:
                row = connection.execute(insert(self.ledger).values(name=name).returning(self.ledger.c.id)).scalar_one()
                response = self._response(mode, name, row)
                self.recorded.append(record(connection, response))
                if mode == "rollback":
                    raise Boom
                if mode == "locked":
                    anyio.from_thread.run(self._start_intruder, request)
            if claimed():
                self.after_commit.append(anyio.from_thread.run(self._state, request))
        except BaseException as exc:
            self.raised.append(exc)
            raise
        return response

    # -- the handler, async (an AsyncSession or an AsyncConnection) --------------------------------------------------

    @asynccontextmanager
    async def _transaction_async(self, engine: AsyncEngine) -> AsyncIterator[AsyncSession | AsyncConnection]:
        if self.kind == "async-session":
            async with AsyncSession(engine) as session, session.begin():
                yield session
        else:
            async with engine.begin() as connection:
                yield connection

    async def _charge_async(self, name: str, request: Request) -> Response:
        mode = request.headers.get("x-mode", "ok")
        self.claimed.append(claimed())
        try:
            if mode == "takeover":
                await self._take_over(request)
            if mode == "other-database":
                async with self._transaction_async(cast("AsyncEngine", self.other)) as other:
                    await other.execute(sql("SELECT 1"))
                    await record_async(other, self._response(mode, name, 0))
            async with self._transaction_async(cast("AsyncEngine", self.engine)) as connection:
                result = await connection.execute(insert(self.ledger).values(name=name).returning(self.ledger.c.id))
                response = self._response(mode, name, result.scalar_one())
                self.recorded.append(await record_async(connection, response))
                if mode == "rollback":
                    raise Boom
                if mode == "locked":
                    await self._start_intruder(request)
            if claimed():
                self.after_commit.append(await self._state(request))
        except BaseException as exc:
            self.raised.append(exc)
            raise
        return response

    # -- what both handlers share -------------------------------------------------------------------------------------

    @staticmethod
    def _response(mode: str, name: str, row: int) -> Response:
        if mode == "streaming":
            return StreamingResponse(iter([b"streamed"]), status_code=201)
        status = 503 if mode == "server-error" else 201
        return JSONResponse({"name": name, "row": row}, status_code=status, headers={"X-Charge": str(row)})

    async def _state(self, request: Request) -> State | None:
        stored = await self.store.get(store_key(request.headers["idempotency-key"]))
        return None if stored is None else stored.state

    async def _take_over(self, request: Request) -> None:
        """What a retry does once the request's lease ran out: claim its key with a token of its own."""
        key = store_key(request.headers["idempotency-key"])
        existing = await self.store.get(key)
        assert existing is not None
        assert existing.state is State.IN_PROGRESS
        self.clock.now += LEASE + 1
        claim = await self.store.claim(key, existing.fingerprint, lease=LEASE, ttl=600.0, token=INTRUDER)
        assert claim == Acquired(INTRUDER), claim

    async def _start_intruder(self, request: Request) -> None:
        """Start a takeover of the key, from another connection, while the transaction that recorded it is open; on
        PostgreSQL, wait until it waits for the record's row lock."""
        key = store_key(request.headers["idempotency-key"])
        existing = await self.store.get(key)
        assert existing is not None
        assert existing.state is State.IN_PROGRESS
        self.clock.now += LEASE + 1
        self.intruder = asyncio.create_task(
            self.store.claim(key, existing.fingerprint, lease=LEASE, ttl=600.0, token=INTRUDER)
        )
        await _poll(self._intruder_waits_for_a_lock, what="the takeover to wait for the record's row lock")

    async def _intruder_waits_for_a_lock(self) -> bool:
        table = self.database.store_options["table"]
        async with await psycopg.AsyncConnection.connect(_libpq(self.database.url), autocommit=True) as connection:
            cursor = await connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (f"%{table}%",),
            )
            row = await cursor.fetchone()
        return row is not None and row[0] == 1


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _poll(probe: Any, *, what: str, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return cast("str", request.param)


@pytest.fixture
async def charges(kind: str, database: Database) -> AsyncIterator[Charges]:
    running = Charges(kind, database)
    try:
        yield running
    finally:
        if running.intruder is not None:
            with suppress(Exception):
                await running.intruder
        await running.close()


def _headers(key: str | None = None, mode: str = "ok") -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Mode": mode}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def _taken_over_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [entry.getMessage() for entry in caplog.records if "taken over" in entry.getMessage()]


# -- recorded in the transaction -------------------------------------------------------------------------------------


async def test_recorded_in_the_transaction_is_replayed_byte_exact(
    charges: Charges, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="idempo")
    async with charges.client() as client:
        first = await client.post("/charge/a", content=BODY, headers=_headers("k-1"))
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        assert charges.claimed == [True]
        assert charges.recorded == [True]
        assert charges.after_commit == [State.COMPLETED]  # by the transaction, before the middleware saw the answer
        assert charges.rows() == 1
        # A session's commit is seen (after_commit): the key is complete, the middleware writes nothing. A
        # connection's is not: the middleware completes as usual, finds it done, and says nothing of a takeover.
        assert charges.calls.store_calls == (["claim"] if charges.kind in SESSIONS else ["claim", "complete"])
        assert _taken_over_warnings(caplog) == []
        stored = await charges.store.get(store_key("k-1"))
        assert stored is not None
        assert stored.state is State.COMPLETED

        retry = await client.post("/charge/a", content=BODY, headers=_headers("k-1"))
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["x-charge"] == first.headers["x-charge"] == str(first.json()["row"])
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert charges.rows() == 1
    assert len(charges.claimed) == 1  # the retry did not run the handler


async def test_rolled_back_after_record_releases_the_key(charges: Charges) -> None:
    async with charges.client() as client:
        failed = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "rollback"))
        assert failed.status_code == 500
        assert [type(exc) for exc in charges.raised] == [Boom]
        assert charges.recorded == [True]  # the completion ran, and rolled back with the row
        assert charges.rows() == 0
        assert charges.calls.store_calls == ["claim", "release"]
        assert await charges.store.get(store_key("k-1")) is None

        retry = await client.post("/charge/a", content=BODY, headers=_headers("k-1"))
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert charges.rows() == 1
    assert len(charges.claimed) == 2  # it ran again


async def test_taken_over_before_record_raises_inside_the_transaction(charges: Charges) -> None:
    async with charges.client() as client:
        response = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "takeover"))
    assert response.status_code == 500
    assert [type(exc) for exc in charges.raised] == [KeyTakenOverError]
    assert charges.recorded == []
    assert charges.rows() == 0  # the charge rolled back with the completion that did not happen
    stored = await charges.store.get(store_key("k-1"))
    assert stored is not None
    assert (stored.state, stored.token) == (State.IN_PROGRESS, INTRUDER)  # the new owner's, untouched


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # SQLite: the claim cannot even begin (write lock)
async def test_takeover_after_record_waits_for_the_commit_and_finds_the_key_completed(charges: Charges) -> None:
    async with charges.client() as client:
        response = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "locked"))
    assert response.status_code == 201, response.text
    assert charges.intruder is not None
    claim = await asyncio.wait_for(charges.intruder, 10.0)
    assert not isinstance(claim, Acquired)
    assert claim.record.state is State.COMPLETED
    assert charges.rows() == 1


# -- what record() refuses ------------------------------------------------------------------------------------------


async def test_record_without_a_key_raises_not_claimed(charges: Charges) -> None:
    async with charges.client() as client:
        response = await client.post("/charge/a", content=BODY, headers=_headers())
    assert response.status_code == 500
    assert charges.claimed == [False]
    assert [type(exc) for exc in charges.raised] == [NotClaimedError]
    assert charges.rows() == 0
    assert charges.calls.store_calls == []


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_a_store_that_is_not_sql_is_the_wrong_database(
    kind: str, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    if store_kind == "memory":
        store: Store = MemoryStore()
    else:
        store = store_from_url(with_options(request.getfixturevalue("redis_url"), prefix=f"tx-{new_table()}:"))
    charges = Charges(kind, _sqlite(tmp_path), store=store)
    try:
        async with charges.client() as client:
            response = await client.post("/charge/a", content=BODY, headers=_headers("k-1"))
        assert response.status_code == 500
        assert [type(exc) for exc in charges.raised] == [WrongDatabaseError]
        assert charges.rows() == 0
        assert charges.calls.store_calls == ["claim", "release"]
        assert await store.get(store_key("k-1")) is None
    finally:
        await charges.close()


async def test_a_transaction_on_another_database_is_the_wrong_database(charges: Charges) -> None:
    async with charges.client() as client:
        response = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "other-database"))
    assert response.status_code == 500
    (raised,) = charges.raised
    assert isinstance(raised, WrongDatabaseError)
    assert ("other.db" if charges.database.name == "sqlite" else "'postgres'") in str(raised)
    assert charges.rows() == 0
    assert await charges.store.get(store_key("k-1")) is None  # released


async def test_a_server_error_is_not_recorded_and_the_key_is_released(charges: Charges) -> None:
    async with charges.client() as client:
        first = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "server-error"))
        assert first.status_code == 503
        assert charges.recorded == [False]
        assert charges.after_commit == [State.IN_PROGRESS]  # nothing recorded: the middleware releases it next
        assert charges.rows() == 1  # the transaction committed: the app answered 503 all the same
        assert charges.calls.store_calls == ["claim", "release"]
        assert await charges.store.get(store_key("k-1")) is None
        retry = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "server-error"))
    assert retry.status_code == 503
    assert "idempotent-replayed" not in retry.headers
    assert charges.recorded == [False, False]  # it ran again


async def test_a_streaming_response_cannot_be_recorded(charges: Charges) -> None:
    async with charges.client() as client:
        response = await client.post("/charge/a", content=BODY, headers=_headers("k-1", "streaming"))
    assert response.status_code == 500
    (raised,) = charges.raised
    assert isinstance(raised, TypeError)
    assert "streaming" in str(raised) or "not known" in str(raised)
    assert charges.rows() == 0
    assert await charges.store.get(store_key("k-1")) is None


async def test_the_sync_and_async_entry_points_refuse_each_others_sessions(tmp_path: Path) -> None:
    """record() on an AsyncSession (or AsyncConnection), record_async() on a Session: a TypeError before anything
    runs, not a coroutine read as a result, nor a blocking statement on the event loop."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    store = cast("Store", store_for(engine, sync=False))
    api = FastAPI()
    raised: list[BaseException] = []

    @api.post("/mixed")
    async def mixed() -> JSONResponse:
        response = JSONResponse({}, status_code=201)
        async with AsyncSession(async_engine) as session, session.begin():
            with pytest.raises(TypeError, match="use record_async") as wrong_async:
                record(session, response)
            raised.append(wrong_async.value)
        async with async_engine.connect() as connection:
            with pytest.raises(TypeError, match="use record_async"):
                record(connection, response)
        with Session(engine) as sync_session, sync_session.begin():
            with pytest.raises(TypeError, match="use record for sync") as wrong_sync:
                await record_async(sync_session, response)
            raised.append(wrong_sync.value)
        return response

    api.add_middleware(IdempotencyMiddleware, store=store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://test") as client:
            answered = await client.post("/mixed", headers={"Idempotency-Key": "mixed"})
        assert answered.status_code == 201
        assert len(raised) == 2
    finally:
        await store.close()
        await async_engine.dispose()
        engine.dispose()
