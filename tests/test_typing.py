"""The static types of the public API, pinned: ``mypy --strict`` checks this file (pyproject's mypy ``files``
include tests/, so ``make typecheck`` does), and pytest runs it against real stores, so that what is pinned is also
what happens.

How a line fails: an ``assert_type`` whose expression's type drifts (a decorator that returns
``Callable[..., Any]``, a store method typed ``Any``, a transport that returns a subclass) is a type error. A line
ending in ``# type: ignore[code]`` is a call that must *not* type-check: strict mypy's ``warn_unused_ignores``
reports the ignore as unused the day it starts to. Those lines sit under ``if TYPE_CHECKING:``, checked, never run.

The names: those of ``idempo`` that are plainly for its users (the middleware and its ``Policy``, the decorator, the
stores and their protocols, ``store_from_url`` and ``sync_store_from_url``, the errors, ``mark_outcome_unknown``),
the record types a store returns (a store author needs them), and ``idempo.client``'s transports. Left out:
``Observer``, ``authorization_principal``, ``default_principal``, ``canonical_json_body`` and
``fingerprint_request``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, assert_type

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from idempo import (
    Acquired,
    BodyTooLargeError,
    Claim,
    ConfigurationError,
    Existing,
    IdempoError,
    IdempotencyMiddleware,
    InProgressError,
    InvalidKeyError,
    KeyReuseError,
    MemoryStore,
    MissingDependency,
    MissingKeyError,
    OutcomeUnknownError,
    Policy,
    Record,
    RequestError,
    ResponseNotStoredError,
    SQLiteStore,
    State,
    Store,
    StoreError,
    StoreFullError,
    SyncStore,
    idempotent,
    mark_outcome_unknown,
    store_from_url,
    sync_store_from_url,
)
from idempo.client import (
    DEFAULT_METHODS,
    DEFAULT_RETRY_STATUSES,
    AsyncIdempotencyTransport,
    IdempotencyTransport,
    is_outcome_unknown,
)
from idempo.stores import ScanningStore, SyncScanningStore, parse_store_url
from idempo.stores.memory import SyncMemoryStore
from idempo.stores.postgres import PostgresStore, SyncPostgresStore
from idempo.stores.redis import RedisStore, SyncRedisStore
from idempo.stores.sqlite import SyncSQLiteStore

# --- the decorator -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    order_id: str
    amount: int


def test_the_decorator_keeps_a_plain_functions_signature() -> None:
    runs: list[str] = []

    @idempotent(MemoryStore(), key="{order_id}")
    def charge(order_id: str, amount: int, *, currency: str = "EUR") -> Receipt:
        runs.append(order_id)
        return Receipt(order_id, amount)

    assert_type(charge("o-1", 100), Receipt)
    # The same call by keyword, the default spelled out: the stored result, rebuilt as the annotated type.
    assert_type(charge(order_id="o-1", amount=100, currency="EUR"), Receipt)
    assert charge(amount=100, order_id="o-1") == Receipt("o-1", 100)
    assert runs == ["o-1"]
    if TYPE_CHECKING:
        charge("o-1", "100")  # type: ignore[arg-type]
        charge("o-1")  # type: ignore[call-arg]
        charge("o-1", 100, "USD")  # type: ignore[call-arg]
        charge("o-1", 100, currncy="USD")  # type: ignore[call-arg]


async def test_the_decorator_keeps_a_coroutine_functions_signature() -> None:
    runs: list[str] = []

    @idempotent(MemoryStore(), key=lambda order_id, **_: f"refund:{order_id}", on_conflict="wait")
    async def refund(order_id: str, *, amount: int) -> list[str]:
        runs.append(order_id)
        return [order_id, str(amount)]

    call = assert_type(refund("o-2", amount=5), Coroutine[Any, Any, list[str]])
    assert_type(await call, list[str])
    assert await refund(order_id="o-2", amount=5) == ["o-2", "5"]
    assert runs == ["o-2"]
    if TYPE_CHECKING:
        await refund("o-2", 5)  # type: ignore[call-arg]
        await refund("o-2", amount="5")  # type: ignore[arg-type]
        idempotent(MemoryStore(), key="k", on_conflict="ignore")  # type: ignore[arg-type]


def test_the_decorator_needs_its_options_by_keyword() -> None:
    with pytest.raises(ConfigurationError, match="positive"):
        idempotent("memory://", key="{order_id}", ttl=0)
    if TYPE_CHECKING:
        idempotent("memory://", "{order_id}")  # type: ignore[call-arg]
        idempotent("memory://")  # type: ignore[call-arg]


# --- the stores --------------------------------------------------------------------------------------------------

# mypy checks a function over a constrained type variable once per constraint: each built-in store on its own.
AnyStore = TypeVar("AnyStore", MemoryStore, SQLiteStore, RedisStore, PostgresStore)
AnySyncStore = TypeVar("AnySyncStore", SyncMemoryStore, SyncSQLiteStore, SyncRedisStore, SyncPostgresStore)


async def exercise(store: AnyStore) -> None:
    """Every method of *store*, its return type pinned, on a key of its own."""
    as_protocol: Store = store  # these two type-check only if the store has the protocols' methods, typed
    as_scanning: ScanningStore = store
    assert isinstance(as_protocol, Store)
    assert isinstance(as_scanning, ScanningStore)
    key = f"typing:{uuid.uuid4()}"

    claim = assert_type(await store.claim(key, "fp", lease=30, ttl=60), Claim)
    assert isinstance(claim, Acquired)
    token = assert_type(claim.token, str)
    assert_type(await store.claim(key, "fp", lease=30, ttl=60, token=str(uuid.uuid4())), Claim)
    assert assert_type(await store.renew(key, token, lease=30), bool)
    record = assert_type(await store.get(key), Record | None)
    assert record is not None
    assert assert_type(record.state, State) is State.IN_PROGRESS
    assert assert_type(record.payload, bytes | None) is None
    assert assert_type(await store.complete(key, token, b"done", ttl=60), bool)
    again = await store.claim(key, "fp", lease=30, ttl=60)
    assert isinstance(again, Existing)
    assert assert_type(again.record, Record).payload == b"done"
    assert not assert_type(await store.release(key, token), bool)
    listed = assert_type(store.scan(key), AsyncIterator[Record])
    assert [found.key async for found in listed] == [key]
    assert assert_type(await store.delete(key), bool)
    assert assert_type(await store.purge_expired(), int) >= 0


def exercise_sync(store: AnySyncStore) -> None:
    """The blocking twin of :func:`exercise`."""
    as_protocol: SyncStore = store  # these two type-check only if the store has the protocols' methods, typed
    as_scanning: SyncScanningStore = store
    assert as_protocol is as_scanning is store
    key = f"typing:{uuid.uuid4()}"

    claim = assert_type(store.claim(key, "fp", lease=30, ttl=60), Claim)
    assert isinstance(claim, Acquired)
    assert assert_type(store.renew(key, claim.token, lease=30), bool)
    assert assert_type(store.get(key), Record | None) is not None
    assert assert_type(store.complete(key, claim.token, b"done", ttl=60), bool)
    assert not assert_type(store.release(key, claim.token), bool)
    assert [found.key for found in assert_type(store.scan(key), Iterator[Record])] == [key]
    assert assert_type(store.delete(key), bool)
    assert assert_type(store.purge_expired(), int) >= 0


async def test_memory_store_types() -> None:
    store = MemoryStore()
    await exercise(store)
    exercise_sync(assert_type(store.sync(), SyncMemoryStore))
    assert_type(await store.close(), None)


async def test_sqlite_store_types(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "typing.db"))
    await exercise(store)
    twin = assert_type(store.sync(), SyncSQLiteStore)
    exercise_sync(twin)
    twin.close()
    await store.close()


async def test_redis_store_types(redis_url: str) -> None:
    store = RedisStore.from_url(parse_store_url(redis_url))
    assert_type(store, RedisStore)
    await exercise(store)
    exercise_sync(assert_type(store.sync(), SyncRedisStore))
    await store.close()  # closes its twin's connections too


async def test_postgres_store_types(postgres_url: str, table: str) -> None:
    store = PostgresStore(postgres_url, table=table)
    await exercise(store)
    exercise_sync(assert_type(store.sync(), SyncPostgresStore))
    await store.close()  # closes its twin too


async def test_stores_from_urls_are_the_protocols(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'url.db'}"
    store = assert_type(store_from_url(url), Store)
    sync = assert_type(sync_store_from_url(url), SyncStore)
    assert (type(store), type(sync)) == (SQLiteStore, SyncSQLiteStore)
    sync.close()
    await store.close()


# --- the errors and mark_outcome_unknown -------------------------------------------------------------------------


def test_the_errors_types() -> None:
    # Assignments that only type-check if the hierarchy is what the docs say.
    configuration: tuple[IdempoError, ValueError] = (ConfigurationError("x"), ConfigurationError("x"))
    missing: tuple[ConfigurationError, ImportError] = (MissingDependency("x"), MissingDependency("x"))
    full: StoreError = StoreFullError("x")
    requests: list[RequestError] = [
        InvalidKeyError("x"),
        MissingKeyError("x"),
        BodyTooLargeError("x"),
        InProgressError("x", retry_after=2),
        KeyReuseError("x"),
        ResponseNotStoredError("x", original_status=201),
        OutcomeUnknownError(),
    ]
    assert [type(error).__name__ for error in (*configuration, *missing, full)] == [
        "ConfigurationError",
        "ConfigurationError",
        "MissingDependency",
        "MissingDependency",
        "StoreFullError",
    ]
    assert [assert_type(error.status, int) for error in requests] == [400, 400, 413, 409, 422, 410, 503]
    assert all(isinstance(assert_type(error.title, str), str) for error in requests)
    assert [assert_type(error.slug, str) for error in requests][-1].endswith("outcome-unknown")
    assert assert_type(InProgressError("x", retry_after=2).retry_after, int) == 2
    assert assert_type(OutcomeUnknownError(retry_after=3).retry_after, int) == 3
    not_stored = ResponseNotStoredError("x", original_status=201)
    assert (assert_type(not_stored.original_status, int), assert_type(not_stored.reason, str)) == (201, "too_large")
    if TYPE_CHECKING:
        InProgressError("x", 2)  # type: ignore[call-arg]
        ResponseNotStoredError("x")  # type: ignore[call-arg]


def test_mark_outcome_unknown_types() -> None:
    runs: list[int] = []

    @idempotent(MemoryStore(), key="{n}")
    def send(n: int) -> int:
        runs.append(n)
        assert_type(mark_outcome_unknown(), None)
        return n

    assert send(1) == 1
    with pytest.raises(OutcomeUnknownError):
        send(1)
    assert runs == [1]
    if TYPE_CHECKING:
        mark_outcome_unknown("why")  # type: ignore[call-arg]


# --- the middleware ----------------------------------------------------------------------------------------------


async def test_the_middleware_types() -> None:
    runs: list[str] = []

    async def create(request: Request) -> JSONResponse:
        runs.append(request.headers["Idempotency-Key"])
        return JSONResponse({"id": len(runs)}, status_code=201)

    app = Starlette(routes=[Route("/orders", create, methods=["POST"])])
    # Starlette types add_middleware's options by the middleware's own signature (a ParamSpec): they are checked.
    app.add_middleware(IdempotencyMiddleware, store=MemoryStore(), ttl=60, on_conflict="wait")
    wrapped = assert_type(IdempotencyMiddleware(app, store="memory://", require_key=True), IdempotencyMiddleware)
    assert assert_type(wrapped.policy, Policy).require_key is True
    as_app: ASGIApp = wrapped  # usable wherever Starlette takes an ASGI app
    assert as_app is wrapped
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = await client.post("/orders", headers={"Idempotency-Key": "k-1"})
        second = await client.post("/orders", headers={"Idempotency-Key": "k-1"})
    assert (first.status_code, second.status_code, second.json(), runs) == (201, 201, {"id": 1}, ["k-1"])
    if TYPE_CHECKING:
        IdempotencyMiddleware(app)  # type: ignore[call-arg]
        IdempotencyMiddleware(app, "memory://")  # type: ignore[call-arg]
        IdempotencyMiddleware(app, store="memory://", on_conflict="ignore")  # type: ignore[arg-type]
        app.add_middleware(IdempotencyMiddleware, store="memory://", tll=60)  # type: ignore[call-arg]


def test_the_policy_types() -> None:
    policy = Policy(ttl=60, on_conflict="wait")
    assert (assert_type(policy.ttl, float), assert_type(policy.lease, float)) == (60, 30)
    middleware = IdempotencyMiddleware(Starlette(), store="memory://", policy=policy, lease=10)
    assert (middleware.policy.ttl, middleware.policy.lease, middleware.policy.on_conflict) == (60, 10, "wait")
    assert assert_type(policy.with_options(ttl=5), Policy).ttl == 5
    if TYPE_CHECKING:
        Policy(60)  # type: ignore[call-arg]
        Policy(tll=60)  # type: ignore[call-arg]
        Policy(on_conflict="ignore")  # type: ignore[arg-type]
        policy.ttl = 5  # type: ignore[misc]


# --- the client transports ---------------------------------------------------------------------------------------


def created(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json={"key": request.headers.get("Idempotency-Key")})


def test_the_sync_transport_types() -> None:
    transport = IdempotencyTransport(httpx.MockTransport(created), attempts=2, sleep=lambda _: None)
    as_base: httpx.BaseTransport = transport
    with httpx.Client(transport=as_base) as client:
        response = assert_type(client.post("http://test/charges"), httpx.Response)
    direct = transport.handle_request(httpx.Request("POST", "http://test/charges"))
    assert_type(direct, httpx.Response)
    assert assert_type(is_outcome_unknown(response), bool) is False
    assert uuid.UUID(response.json()["key"]).version == 4
    assert assert_type(DEFAULT_METHODS, frozenset[str]) == {"POST", "PUT", "PATCH", "DELETE"}
    assert assert_type(DEFAULT_RETRY_STATUSES, frozenset[int]) == {409, 429, 502, 503, 504}
    if TYPE_CHECKING:
        IdempotencyTransport(httpx.AsyncHTTPTransport())  # type: ignore[arg-type]
        IdempotencyTransport(sleep=lambda _: None, attempts="2")  # type: ignore[arg-type]


async def test_the_async_transport_types() -> None:
    async def no_wait(_: float) -> None:
        return None

    transport = AsyncIdempotencyTransport(httpx.MockTransport(created), sleep=no_wait)
    as_base: httpx.AsyncBaseTransport = transport
    async with httpx.AsyncClient(transport=as_base) as client:
        response = assert_type(await client.put("http://test/charges/1"), httpx.Response)
    assert_type(await transport.handle_async_request(httpx.Request("PATCH", "http://test/charges/1")), httpx.Response)
    assert response.json()["key"] is not None
    if TYPE_CHECKING:
        AsyncIdempotencyTransport(httpx.HTTPTransport())  # type: ignore[arg-type]
        AsyncIdempotencyTransport(sleep=time.sleep)  # type: ignore[arg-type]
