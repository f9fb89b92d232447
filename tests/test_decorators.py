"""``@idempotent``: sync and async functions over the built-in stores, run once per key, their results replayed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import decimal
import enum
import inspect
import os
import subprocess
import sys
import threading
import uuid
import zoneinfo
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, assert_type

import pydantic
import pytest

from idempo import (
    ConfigurationError,
    InProgressError,
    KeyReuseError,
    MemoryStore,
    OutcomeUnknownError,
    Record,
    ResponseNotStoredError,
    SQLiteStore,
    State,
    Store,
    StoreError,
    StoreFullError,
    idempotent,
    mark_outcome_unknown,
    store_from_url,
)
from idempo._core.records import Claim, Existing
from idempo.decorators import JSONSerializer, Serializer, fingerprint_arguments
from idempo.stores import SyncStore
from idempo.stores.memory import SyncMemoryStore
from tests.support.middleware import DelegatingStore, HeldStore

ASYNC_KINDS = ["memory", "sqlite", "redis", "postgres"]
SYNC_KINDS = ["memory", "memory-sync", "sqlite", "redis", "postgres"]


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store | SyncStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "memory-sync":
        return SyncMemoryStore()
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "idem.db")
    if kind == "redis":
        return store_from_url(request.getfixturevalue("redis_url"))
    assert kind == "postgres"
    return store_from_url(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=ASYNC_KINDS)
async def astore(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An async store of each kind (Redis and PostgreSQL skip when their server is not running)."""
    store = _open(request.param, tmp_path, request)
    assert isinstance(store, Store)
    yield store
    await store.close()


@pytest.fixture(params=SYNC_KINDS)
def sstore(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store | SyncStore]:
    """What a sync function is given: an async built-in store (the decorator uses its ``.sync()``) or a SyncStore."""
    store = _open(request.param, tmp_path, request)
    yield store
    if inspect.iscoroutinefunction(store.claim):
        asyncio.run(store.close())  # type: ignore[arg-type]
    else:
        store.close()


def _sync_view(store: Store | SyncStore) -> SyncStore:
    """The store's records through the blocking API."""
    if inspect.iscoroutinefunction(store.claim):
        twin: SyncStore = store.sync()  # type: ignore[union-attr]
        return twin
    return store  # type: ignore[return-value]


@pytest.fixture
def ns() -> str:
    """A namespace of the test's own, so that stores shared between runs (Redis, PostgreSQL) never mix keys."""
    return f"test-{uuid.uuid4().hex}"


class Order(pydantic.BaseModel):
    id: int
    amount: int
    tags: list[str] = []


@dataclasses.dataclass
class Line:
    sku: str
    quantity: int


@dataclasses.dataclass
class Receipt:
    order_id: int
    lines: list[Line]
    order: Order | None = None


class Status(enum.Enum):
    PAID = "paid"
    REFUNDED = "refunded"


class Point(NamedTuple):
    x: int
    y: int


class Counter:
    """Counts the runs of a side effect, from any thread."""

    def __init__(self) -> None:
        self.runs = 0
        self._lock = threading.Lock()

    def hit(self) -> int:
        with self._lock:
            self.runs += 1
            return self.runs


# -- run once, replay -------------------------------------------------------------------------------------------


async def test_async_runs_once_and_replays(astore: Store, ns: str) -> None:
    counter = Counter()

    @idempotent(astore, key="charge:{order_id}", namespace=ns)
    async def charge(order_id: int, amount: int) -> dict[str, Any]:
        return {"order_id": order_id, "amount": amount, "run": counter.hit()}

    first = await charge(1, 100)
    assert first == {"order_id": 1, "amount": 100, "run": 1}
    assert await charge(1, 100) == first
    assert await charge(order_id=1, amount=100) == first  # the same call, bound the same way
    assert counter.runs == 1
    assert await charge(2, 100) == {"order_id": 2, "amount": 100, "run": 2}
    record = await astore.get(f"fn:{ns}:charge:1")
    assert record is not None
    assert record.state is State.COMPLETED


def test_sync_runs_once_and_replays(sstore: Store | SyncStore, ns: str) -> None:
    counter = Counter()

    @idempotent(sstore, key="charge:{order_id}", namespace=ns)
    def charge(order_id: int, amount: int) -> list[int]:
        return [order_id, amount, counter.hit()]

    assert charge(1, 100) == [1, 100, 1]
    assert charge(1, amount=100) == [1, 100, 1]
    assert counter.runs == 1
    record = _sync_view(sstore).get(f"fn:{ns}:charge:1")
    assert record is not None
    assert record.state is State.COMPLETED


async def test_async_model_and_dataclass_results_are_rebuilt(astore: Store, ns: str) -> None:
    counter = Counter()

    @idempotent(astore, key="{order_id}", namespace=f"{ns}-order")
    async def order(order_id: int) -> Order:
        counter.hit()
        return Order(id=order_id, amount=5, tags=["a"])

    @idempotent(astore, key="{order_id}", namespace=f"{ns}-receipt")
    async def receipt(order_id: int) -> Receipt:
        counter.hit()
        return Receipt(order_id, [Line("x", 2)], Order(id=order_id, amount=5))

    @idempotent(astore, key="{order_id}", namespace=f"{ns}-orders")
    async def orders(order_id: int) -> list[Order]:
        counter.hit()
        return [Order(id=order_id, amount=1), Order(id=order_id + 1, amount=2)]

    @idempotent(astore, key="{order_id}", namespace=f"{ns}-lines")
    async def lines(order_id: int) -> dict[str, Line]:
        counter.hit()
        return {"first": Line("a", order_id)}

    for _ in range(2):
        assert await order(7) == Order(id=7, amount=5, tags=["a"])
        assert await receipt(7) == Receipt(7, [Line("x", 2)], Order(id=7, amount=5))
        assert await orders(7) == [Order(id=7, amount=1), Order(id=8, amount=2)]
        assert await lines(7) == {"first": Line("a", 7)}
    assert counter.runs == 4


def test_sync_model_dataclass_tuple_and_none_results(sstore: Store | SyncStore, ns: str) -> None:
    counter = Counter()

    @idempotent(sstore, key="{n}", namespace=f"{ns}-receipt")
    def receipt(n: int) -> Receipt:
        counter.hit()
        return Receipt(n, [Line("x", n)])

    @idempotent(sstore, key="{n}", namespace=f"{ns}-pair")
    def pair(n: int) -> tuple[Order, int]:
        counter.hit()
        return Order(id=n, amount=1), n

    @idempotent(sstore, key="{n}", namespace=f"{ns}-none")
    def nothing(n: int) -> None:
        counter.hit()

    @idempotent(sstore, key="{n}", namespace=f"{ns}-enum")
    def status(n: int) -> dict[str, Status | None]:
        counter.hit()
        return {"now": Status.PAID, "before": None}

    @idempotent(sstore, key="{n}", namespace=f"{ns}-point")
    def point(n: int) -> Point:
        counter.hit()
        return Point(n, -n)

    for _ in range(2):
        assert receipt(3) == Receipt(3, [Line("x", 3)])
        assert pair(3) == (Order(id=3, amount=1), 3)
        assert nothing(3) is None
        assert status(3) == {"now": Status.PAID, "before": None}
        assert type(point(3)) is Point
        assert point(3) == Point(3, -3)
    assert counter.runs == 5


# -- key reuse, exceptions, store failures ------------------------------------------------------------------------


async def test_async_different_arguments_are_a_key_reuse(astore: Store, ns: str) -> None:
    counter = Counter()

    @idempotent(astore, key="job", namespace=ns)
    async def job(amount: int) -> int:
        return counter.hit()

    assert await job(1) == 1
    with pytest.raises(KeyReuseError, match="different arguments") as caught:
        await job(2)
    assert caught.value.status == 422
    assert counter.runs == 1


def test_sync_different_arguments_are_a_key_reuse(sstore: Store | SyncStore, ns: str) -> None:
    @idempotent(sstore, key="job", namespace=ns)
    def job(amount: int) -> int:
        return amount

    assert job(1) == 1
    with pytest.raises(KeyReuseError):
        job(2)


async def test_async_exception_stores_nothing_and_the_next_call_runs(astore: Store, ns: str) -> None:
    counter = Counter()

    @idempotent(astore, key="{n}", namespace=ns)
    async def flaky(n: int) -> int:
        if counter.hit() == 1:
            raise RuntimeError("boom")
        return n

    with pytest.raises(RuntimeError, match="boom"):
        await flaky(1)
    assert await astore.get(f"fn:{ns}:1") is None
    assert await flaky(1) == 1
    assert await flaky(1) == 1
    assert counter.runs == 2


def test_sync_exception_stores_nothing_and_the_next_call_runs(sstore: Store | SyncStore, ns: str) -> None:
    counter = Counter()

    @idempotent(sstore, key="{n}", namespace=ns)
    def flaky(n: int) -> int:
        if counter.hit() == 1:
            raise RuntimeError("boom")
        return n

    with pytest.raises(RuntimeError, match="boom"):
        flaky(1)
    assert _sync_view(sstore).get(f"fn:{ns}:1") is None
    assert flaky(1) == 1
    assert flaky(1) == 1
    assert counter.runs == 2


def test_an_unserializable_result_is_kept_done_and_a_repeat_raises_instead_of_running(ns: str) -> None:
    """The function ran: a repeat must never run it again because of its result's type."""
    store = SyncMemoryStore()
    counter = Counter()

    class Opaque:
        pass

    @idempotent(store, key="k", namespace=ns)
    def odd() -> object:
        counter.hit()
        return Opaque()

    first = odd()
    assert isinstance(first, Opaque)  # the caller that ran it gets its result
    for _ in range(2):
        with pytest.raises(ResponseNotStoredError, match="not stored") as caught:
            odd()
        assert caught.value.reason == "unserializable"
    assert counter.runs == 1
    record = store.get(f"fn:{ns}:k")
    assert record is not None
    assert record.state is State.COMPLETED


class _BrokenStore(MemoryStore):
    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        raise StoreError("the store is down")


class _BrokenSyncStore(SyncMemoryStore):
    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        raise StoreError("the store is down")


async def test_store_error_propagates_and_nothing_runs() -> None:
    counter = Counter()

    @idempotent(_BrokenStore(), key="k")
    async def job() -> int:
        return counter.hit()

    @idempotent(_BrokenSyncStore(), key="k")
    def sync_job() -> int:
        return counter.hit()

    with pytest.raises(StoreError):
        await job()
    with pytest.raises(StoreError):
        sync_job()
    assert counter.runs == 0


# -- concurrent calls -------------------------------------------------------------------------------------------------


class _WatchedStore(DelegatingStore):
    """An async store that reports renewals and the in-progress records its claims find."""

    def __init__(self, inner: Store, *, renewals_wanted: int = 1) -> None:
        super().__init__(inner)
        self.renewals = 0
        self.renewals_wanted = renewals_wanted
        self.renewed = asyncio.Event()
        self.conflict_seen = asyncio.Event()

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        claim = await self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        if isinstance(claim, Existing) and claim.record.state is State.IN_PROGRESS:
            self.conflict_seen.set()
        return claim

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        owned = await self.inner.renew(key, token, lease=lease)
        self.renewals += 1
        if self.renewals >= self.renewals_wanted:
            self.renewed.set()
        return owned


class _WatchedSyncStore:
    """The blocking twin of :class:`_WatchedStore`, with thread events."""

    def __init__(self, inner: SyncStore, *, renewals_wanted: int = 1) -> None:
        self.inner = inner
        self.renewals = 0
        self.renewals_wanted = renewals_wanted
        self.renewed = threading.Event()
        self.conflict_seen = threading.Event()

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        claim = self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        if isinstance(claim, Existing) and claim.record.state is State.IN_PROGRESS:
            self.conflict_seen.set()
        return claim

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        owned = self.inner.renew(key, token, lease=lease)
        self.renewals += 1
        if self.renewals >= self.renewals_wanted:
            self.renewed.set()
        return owned

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return self.inner.complete(key, token, payload, ttl=ttl)

    def release(self, key: str, token: str) -> bool:
        return self.inner.release(key, token)

    def get(self, key: str) -> Record | None:
        return self.inner.get(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def purge_expired(self) -> int:
        return self.inner.purge_expired()

    def close(self) -> None:
        self.inner.close()


async def test_async_concurrent_calls_run_once(astore: Store, ns: str) -> None:
    counter = Counter()

    @idempotent(astore, key="{n}", namespace=ns, on_conflict="wait", wait_timeout=10)
    async def job(n: int) -> int:
        await asyncio.sleep(0)  # let the others claim meanwhile
        return n * 10 + counter.hit()

    results = await asyncio.gather(*(job(4) for _ in range(20)))
    assert results == [41] * 20
    assert counter.runs == 1


def test_sync_concurrent_threads_run_once(sstore: Store | SyncStore, ns: str) -> None:
    counter = Counter()
    start = threading.Barrier(16)

    @idempotent(sstore, key="{n}", namespace=ns, on_conflict="wait", wait_timeout=10)
    def job(n: int) -> int:
        return n * 10 + counter.hit()

    def call() -> int:
        start.wait(timeout=10)
        return job(4)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: call(), range(16)))
    assert results == [41] * 16
    assert counter.runs == 1


async def test_async_in_progress_raises_or_waits(ns: str) -> None:
    store = _WatchedStore(MemoryStore())
    gate = asyncio.Event()
    entered = asyncio.Event()
    counter = Counter()

    @idempotent(store, key="k", namespace=ns, lease=60)
    async def slow() -> int:
        entered.set()
        await gate.wait()
        return counter.hit()

    @idempotent(store, key="k", namespace=ns, lease=60, on_conflict="wait", wait_timeout=10)
    async def waiting() -> int:
        raise AssertionError("never runs: the other call completes")

    first = asyncio.create_task(slow())
    await entered.wait()
    with pytest.raises(InProgressError) as caught:
        await slow()
    assert caught.value.status == 409
    assert 1 <= caught.value.retry_after <= 60
    store.conflict_seen.clear()
    second = asyncio.create_task(waiting())
    await store.conflict_seen.wait()
    gate.set()
    assert await first == 1
    assert await second == 1
    assert counter.runs == 1


async def test_async_wait_gives_up_after_wait_timeout(ns: str) -> None:
    store = MemoryStore()
    gate = asyncio.Event()
    entered = asyncio.Event()

    @idempotent(store, key="k", namespace=ns, on_conflict="wait", wait_timeout=0.05)
    async def slow() -> int:
        entered.set()
        await gate.wait()
        return 1

    first = asyncio.create_task(slow())
    await entered.wait()
    with pytest.raises(InProgressError):
        await slow()
    gate.set()
    assert await first == 1


async def test_async_waiter_runs_when_the_first_call_fails(ns: str) -> None:
    store = _WatchedStore(MemoryStore())
    gate = asyncio.Event()
    entered = asyncio.Event()
    counter = Counter()

    @idempotent(store, key="k", namespace=ns, on_conflict="wait", wait_timeout=10)
    async def job() -> int:
        run = counter.hit()
        if run == 1:
            entered.set()
            await gate.wait()
            raise RuntimeError("first attempt fails")
        return run

    first = asyncio.create_task(job())
    await entered.wait()
    second = asyncio.create_task(job())
    await store.conflict_seen.wait()
    gate.set()
    with pytest.raises(RuntimeError):
        await first
    assert await second == 2
    assert counter.runs == 2


def test_sync_in_progress_raises_or_waits(ns: str) -> None:
    store = _WatchedSyncStore(SyncMemoryStore())
    gate = threading.Event()
    entered = threading.Event()
    counter = Counter()

    @idempotent(store, key="k", namespace=ns, lease=60)
    def slow() -> int:
        entered.set()
        assert gate.wait(timeout=10)
        return counter.hit()

    @idempotent(store, key="k", namespace=ns, lease=60, on_conflict="wait", wait_timeout=10)
    def waiting() -> int:
        raise AssertionError("never runs: the other call completes")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(slow)
        assert entered.wait(timeout=10)
        with pytest.raises(InProgressError):
            slow()
        store.conflict_seen.clear()
        second = pool.submit(waiting)
        assert store.conflict_seen.wait(timeout=10)
        gate.set()
        assert first.result(timeout=10) == 1
        assert second.result(timeout=10) == 1
    assert counter.runs == 1


def test_sync_waiter_takes_over_the_key_of_a_dead_owner(ns: str) -> None:
    """A worker that died holding the key: a waiting call takes it over once the dead one's lease runs out."""
    store = SyncMemoryStore()
    counter = Counter()

    @idempotent(store, key="{n}", namespace=ns, on_conflict="wait", wait_timeout=10)
    def job(n: int) -> int:
        return counter.hit()

    dead = store.claim(f"fn:{ns}:1", fingerprint_arguments({"n": 1}), lease=0.05, ttl=60)
    assert not isinstance(dead, Existing)
    assert job(1) == 1
    assert job(1) == 1
    assert counter.runs == 1


def test_sync_wait_gives_up_after_wait_timeout(ns: str) -> None:
    store = SyncMemoryStore()
    gate = threading.Event()
    entered = threading.Event()

    @idempotent(store, key="k", namespace=ns, on_conflict="wait", wait_timeout=0.05)
    def slow() -> int:
        entered.set()
        assert gate.wait(timeout=10)
        return 1

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(slow)
        assert entered.wait(timeout=10)
        with pytest.raises(InProgressError):
            slow()
        gate.set()
        assert first.result(timeout=10) == 1


# -- lease renewal --------------------------------------------------------------------------------------------------


async def test_async_lease_is_renewed_while_the_function_runs(ns: str) -> None:
    store = _WatchedStore(MemoryStore(), renewals_wanted=3)

    @idempotent(store, key="k", namespace=ns, lease=0.15)
    async def long_job() -> str:
        await asyncio.wait_for(store.renewed.wait(), timeout=10)
        record = await store.get(f"fn:{ns}:k")
        assert record is not None
        assert record.state is State.IN_PROGRESS
        return "done"

    assert await long_job() == "done"
    assert store.renewals >= 3
    record = await store.get(f"fn:{ns}:k")
    assert record is not None
    assert record.state is State.COMPLETED  # the renewals kept the key: it completed


def test_sync_lease_is_renewed_by_a_thread_while_the_function_runs(ns: str) -> None:
    store = _WatchedSyncStore(SyncMemoryStore(), renewals_wanted=3)

    @idempotent(store, key="k", namespace=ns, lease=0.15)
    def long_job() -> str:
        assert store.renewed.wait(timeout=10)
        return "done"

    assert long_job() == "done"
    assert store.renewals >= 3
    record = store.get(f"fn:{ns}:k")
    assert record is not None
    assert record.state is State.COMPLETED
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("idempo-renew")]


# -- keys -----------------------------------------------------------------------------------------------------------


async def test_key_callable_and_attribute_format(ns: str) -> None:
    store = MemoryStore()

    @idempotent(store, key=lambda order, note="": f"order-{order.id}", namespace=ns)
    async def by_callable(order: Order, note: str = "") -> int:
        return order.amount

    @idempotent(store, key="{order.id}/{kind}", namespace=ns)
    def by_format(order: Order, kind: str = "refund") -> int:
        return -order.amount

    assert await by_callable(Order(id=3, amount=9)) == 9
    assert by_format(Order(id=3, amount=9)) == -9
    assert await store.get(f"fn:{ns}:order-3") is not None
    assert await store.get(f"fn:{ns}:3/refund") is not None


def test_default_namespace_is_the_module_and_qualname() -> None:
    store = SyncMemoryStore()

    @idempotent(store, key="{n}")
    def job(n: int) -> int:
        return n

    job(5)
    namespace = f"{__name__}.test_default_namespace_is_the_module_and_qualname.<locals>.job"
    assert store.get(f"fn:{namespace}:5") is not None


async def test_methods_sync_and_async(ns: str) -> None:
    store = MemoryStore()
    counter = Counter()

    class Account:
        def __init__(self, number: str) -> None:
            self.number = number

        @idempotent(store, key="{self.number}:{amount}", namespace=ns)
        def deposit(self, amount: int) -> int:
            return counter.hit()

        @idempotent(store, key="{self.number}:{amount}", namespace=f"{ns}-async")
        async def withdraw(self, amount: int) -> int:
            return -counter.hit()

    assert Account("a").deposit(5) == 1
    assert Account("a").deposit(5) == 1  # another instance (default repr): the same call
    assert Account("b").deposit(5) == 2
    assert await Account("a").withdraw(5) == -3
    assert await Account("a").withdraw(5) == -3
    assert counter.runs == 3


def test_key_naming_a_missing_argument_is_a_configuration_error() -> None:
    @idempotent(SyncMemoryStore(), key="{nope}")
    def job(n: int) -> int:
        return n

    with pytest.raises(ConfigurationError, match="nope"):
        job(1)


# -- sync from inside a running loop; a store URL ---------------------------------------------------------------------


async def test_sync_function_called_from_a_running_loop(tmp_path: Path, ns: str) -> None:
    counter = Counter()
    memory = MemoryStore()
    url = f"sqlite:///{tmp_path / 'idem.db'}"

    @idempotent(memory, key="{n}", namespace=ns, lease=0.15)
    def in_memory(n: int) -> int:
        return n + counter.hit()

    assert asyncio.get_running_loop().is_running()
    assert in_memory(1) == 2
    assert in_memory(1) == 2
    assert await memory.get(f"fn:{ns}:1") is not None  # the async store and its .sync() share records

    @idempotent(url, key="{n}", namespace=ns, lease=0.15)
    def in_sqlite(n: int) -> int:
        return n + counter.hit()

    assert in_sqlite(1) == 3
    assert in_sqlite(1) == 3
    assert counter.runs == 2


async def test_sqlite_url_shared_by_a_sync_and_an_async_function(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'idem.db'}"
    counter = Counter()

    @idempotent(url, key="{n}", namespace="shared")
    def sync_job(n: int) -> Order:
        return Order(id=n, amount=counter.hit())

    @idempotent(url, key="{n}", namespace="shared")
    async def async_job(n: int) -> Order:
        return Order(id=n, amount=counter.hit())

    assert sync_job(1) == Order(id=1, amount=1)
    assert await async_job(1) == Order(id=1, amount=1)  # the sync call's result, from the same file
    assert await async_job(2) == Order(id=2, amount=2)
    assert sync_job(2) == Order(id=2, amount=2)
    assert counter.runs == 2


# -- fingerprints and serializers -------------------------------------------------------------------------------------


class _Opaque:
    """An object with the default repr (which shows its address)."""


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"_Named({self.name!r})"


def test_fingerprint_of_arguments() -> None:
    same = fingerprint_arguments({"a": {"x": 1, "y": [1, 2]}, "b": "é"})
    assert same == fingerprint_arguments({"b": "é", "a": {"y": [1, 2], "x": 1}})
    assert len(same) == 64
    assert same != fingerprint_arguments({"a": {"x": 1, "y": [2, 1]}, "b": "é"})
    assert fingerprint_arguments({"m": Order(id=1, amount=2)}) == fingerprint_arguments(
        {"m": {"id": 1, "amount": 2, "tags": []}}
    )
    assert fingerprint_arguments({"d": Line("a", 1)}) == fingerprint_arguments({"d": {"sku": "a", "quantity": 1}})
    assert fingerprint_arguments({"s": {"b", "a", "c"}}) == fingerprint_arguments({"s": {"c", "a", "b"}})
    assert fingerprint_arguments({"o": _Opaque()}) == fingerprint_arguments({"o": _Opaque()})
    assert fingerprint_arguments({"o": _Named("a")}) != fingerprint_arguments({"o": _Named("b")})
    assert fingerprint_arguments({"k": {1: "a"}}) == fingerprint_arguments({"k": {1: "a"}})


def test_a_client_passed_in_does_not_make_every_call_different(ns: str) -> None:
    store = SyncMemoryStore()
    counter = Counter()

    @idempotent(store, key="{n}", namespace=ns)
    def job(client: _Opaque, n: int) -> int:
        return counter.hit()

    assert job(_Opaque(), 1) == 1
    assert job(_Opaque(), 1) == 1  # a new client, the same call


class _Reversing:
    """A serializer of strings that stores them reversed, to see that it is used both ways."""

    def __init__(self) -> None:
        self.annotations: list[Any] = []

    def dumps(self, value: Any) -> bytes:
        return str(value)[::-1].encode()

    def loads(self, data: bytes, annotation: Any) -> Any:
        self.annotations.append(annotation)
        return data.decode()[::-1]


async def test_pluggable_serializer(ns: str) -> None:
    store = MemoryStore()
    serializer = _Reversing()
    assert isinstance(serializer, Serializer)
    assert isinstance(JSONSerializer(), Serializer)

    @idempotent(store, key="k", namespace=ns, serializer=serializer)
    async def job() -> str:
        return "abc"

    assert await job() == "abc"
    record = await store.get(f"fn:{ns}:k")
    assert record is not None
    assert record.payload == b"\x04cba"  # framed: a result, not one of the markers
    assert await job() == "abc"
    assert serializer.annotations == [str]


# -- the decorated function itself, configuration ---------------------------------------------------------------------


def test_signature_name_doc_and_wrapped_are_kept() -> None:
    def charge(order_id: int, amount: int = 5, *, note: str = "") -> int:
        """Charge an order."""
        return amount

    async def acharge(order_id: int, amount: int = 5, *, note: str = "") -> int:
        """Charge an order, asynchronously."""
        return amount

    sync_charge = idempotent(MemoryStore(), key="{order_id}")(charge)
    async_charge = idempotent(MemoryStore(), key="{order_id}")(acharge)
    assert inspect.signature(sync_charge) == inspect.signature(charge)
    assert inspect.signature(async_charge) == inspect.signature(acharge)
    assert (sync_charge.__name__, sync_charge.__doc__) == ("charge", "Charge an order.")
    assert (async_charge.__name__, async_charge.__doc__) == ("acharge", "Charge an order, asynchronously.")
    assert sync_charge.__wrapped__ is charge  # type: ignore[attr-defined]
    assert async_charge.__wrapped__ is acharge  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(async_charge)
    assert not inspect.iscoroutinefunction(sync_charge)


async def test_the_decorated_functions_keep_their_types() -> None:
    """Checked by mypy --strict: the decorated functions have their original parameter and return types."""
    store = MemoryStore()

    @idempotent(store, key="{order_id}")
    def charge(order_id: int, amount: int) -> Order:
        return Order(id=order_id, amount=amount)

    @idempotent(store, key="{order_id}")
    async def acharge(order_id: int, amount: int) -> Receipt:
        return Receipt(order_id, [])

    assert_type(charge(1, 2), Order)
    assert_type(await acharge(1, 2), Receipt)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="positive"):
        idempotent(MemoryStore(), key="k", ttl=0)
    with pytest.raises(ConfigurationError, match="on_conflict"):
        idempotent(MemoryStore(), key="k", on_conflict="block")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="format string or a callable"):
        idempotent(MemoryStore(), key=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="store must be"):
        idempotent(None, key="k")(lambda: None)  # type: ignore[arg-type]

    async def coroutine_fn() -> None:
        return None

    with pytest.raises(ConfigurationError, match="needs an async Store"):
        idempotent(SyncMemoryStore(), key="k")(coroutine_fn)

    def generator() -> Iterator[int]:
        yield 1

    with pytest.raises(ConfigurationError, match="generator"):
        idempotent(MemoryStore(), key="k")(generator)


def test_async_store_without_sync_twin_for_a_sync_function() -> None:
    def fn() -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"without \.sync\(\)"):
        idempotent(_WatchedStore(MemoryStore()), key="k")(fn)


def test_unresolvable_return_annotation_fails_before_running() -> None:
    counter = Counter()

    @idempotent(SyncMemoryStore(), key="k")
    def job() -> NotDefinedAnywhere:  # type: ignore[name-defined]  # noqa: F821
        counter.hit()

    with pytest.raises(ConfigurationError, match="return annotation"):
        job()
    assert counter.runs == 0


# -- results of every common type, unknown outcomes, full stores (the hardening issue) ---------------------------------


class _Tagged(enum.Enum):
    A = "a"


_LOSSLESS: list[Any] = [
    datetime.datetime(2026, 12, 4, 17, 0, 1, 123456),
    datetime.datetime(2026, 12, 4, 17, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))),
    datetime.datetime(2026, 3, 29, 2, 30, fold=0, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
    datetime.date(2026, 12, 4),
    datetime.time(23, 59, 59, 999999),
    datetime.timedelta(days=-1, seconds=5, microseconds=7),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    decimal.Decimal("12.3400"),
    decimal.Decimal("-0"),
    decimal.Decimal("NaN"),
    b"\x00\xffbytes",
    bytearray(b"mutable"),
    complex(1.5, -2),
    (1, "two", (3.0, None)),
    {1, 2, 3},
    frozenset({"a", ("b", 1)}),
    {1: "int key", (2, 3): "tuple key", None: "none key"},
    {"__idempo__": ["tuple", [1]]},  # a user's dict that looks like a tag
    {"nested": [datetime.date(2026, 1, 1), {"set": {decimal.Decimal("1.5")}}]},
    [],
    {},
    "plain",
    1.5,
    float("inf"),
    True,
    None,
]


@pytest.mark.parametrize("value", _LOSSLESS, ids=[f"{type(value).__name__}-{i}" for i, value in enumerate(_LOSSLESS)])
def test_json_serializer_brings_back_common_types_as_they_were(value: Any) -> None:
    serializer = JSONSerializer()
    back = serializer.loads(serializer.dumps(value), Any)
    assert back == value or (value != value and back != back)  # NaN is not equal to itself
    assert type(back) is type(value)
    if isinstance(value, datetime.datetime):
        assert back.tzinfo == value.tzinfo
        assert back.utcoffset() == value.utcoffset()
    if isinstance(value, decimal.Decimal):
        assert str(back) == str(value)


def test_json_serializer_stores_enums_and_str_subclasses_as_their_values() -> None:
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps({"status": _Tagged.A}), Any) == {"status": "a"}
    assert serializer.loads(serializer.dumps({"status": _Tagged.A}), dict[str, _Tagged]) == {"status": _Tagged.A}


async def test_a_coroutine_returning_a_datetime_runs_once_and_repeats_get_it_back(ns: str) -> None:
    counter = Counter()
    when = datetime.datetime(2026, 12, 4, 12, tzinfo=datetime.UTC)

    @idempotent(MemoryStore(), key="{n}", namespace=ns)
    async def charge(n: int) -> Any:
        counter.hit()
        return {"at": when, "id": uuid.UUID(int=n), "amount": decimal.Decimal("9.99")}

    results = [await charge(1) for _ in range(3)]
    assert results == [{"at": when, "id": uuid.UUID(int=1), "amount": decimal.Decimal("9.99")}] * 3
    assert counter.runs == 1


def test_an_unserializable_result_of_a_coroutine_is_kept_done_too(ns: str) -> None:
    counter = Counter()

    @idempotent(MemoryStore(), key="k", namespace=ns)
    async def odd() -> object:
        counter.hit()
        return threading.Lock()

    async def calls() -> None:
        await odd()
        with pytest.raises(ResponseNotStoredError):
            await odd()

    asyncio.run(calls())
    assert counter.runs == 1


@pytest.mark.parametrize("how", ["raise", "mark and return"])
def test_an_unknown_outcome_keeps_the_key_and_repeats_raise(sstore: Store | SyncStore, ns: str, how: str) -> None:
    counter = Counter()

    @idempotent(sstore, key="{n}", namespace=ns, unknown_outcome_ttl=300)
    def send(n: int) -> int:
        counter.hit()
        if how == "raise":
            raise OutcomeUnknownError("the provider timed out after the request was sent")
        mark_outcome_unknown()
        return n

    if how == "raise":
        with pytest.raises(OutcomeUnknownError, match="provider timed out"):
            send(1)
    else:
        assert send(1) == 1
    for _ in range(2):
        with pytest.raises(OutcomeUnknownError) as caught:
            send(1)
        assert 1 <= caught.value.retry_after <= 300
    assert counter.runs == 1


async def test_an_unknown_outcome_of_a_coroutine_keeps_the_key(astore: Store, ns: str) -> None:
    counter = Counter()

    @idempotent(astore, key="{n}", namespace=ns)
    async def send(n: int) -> int:
        counter.hit()
        await asyncio.sleep(0)
        mark_outcome_unknown()
        raise RuntimeError("the connection broke before the reply")

    with pytest.raises(RuntimeError):
        await send(1)
    with pytest.raises(OutcomeUnknownError):
        await send(1)
    assert counter.runs == 1


def test_an_unknown_outcome_inside_a_function_is_the_callers_too(ns: str) -> None:
    """A function that runs inside another keyed operation: its unknown outcome is the outer one's as well."""
    store = SyncMemoryStore()

    @idempotent(store, key="inner", namespace=f"{ns}-inner")
    def inner() -> None:
        raise OutcomeUnknownError

    @idempotent(store, key="outer", namespace=f"{ns}-outer")
    def outer() -> str:
        with contextlib.suppress(OutcomeUnknownError):  # swallowed: the outer call still cannot know what happened
            inner()
        return "done"

    assert outer() == "done"
    with pytest.raises(OutcomeUnknownError):
        outer()


class _FullStore(DelegatingStore):
    """A real store that, like Redis at maxmemory or a full disk, refuses to take a payload over a few bytes."""

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        if len(payload) > 16:
            raise StoreFullError("OOM command not allowed when used memory > maxmemory")
        return await self.inner.complete(key, token, payload, ttl=ttl)


async def test_a_result_the_full_store_refuses_is_kept_as_not_stored(ns: str) -> None:
    counter = Counter()
    store = _FullStore(MemoryStore())

    @idempotent(store, key="k", namespace=ns)
    async def charge() -> str:
        counter.hit()
        return "a receipt far longer than the few bytes the full store still takes"

    assert await charge() == "a receipt far longer than the few bytes the full store still takes"
    with pytest.raises(ResponseNotStoredError) as caught:
        await charge()
    assert caught.value.reason == "store_refused"
    assert counter.runs == 1


async def test_a_coroutine_cancelled_while_its_result_is_stored_still_has_it_stored(ns: str) -> None:
    """The function ran; a timeout around the call (a job queue's, say) fires while its result is being stored.
    Abandoned there, the completion would leave the key in progress, and once the lease ran out a repeat would run
    the function again: it goes on to its end instead, and the repeat gets the result."""
    counter = Counter()
    store = HeldStore("complete")

    @idempotent(store, key="k", namespace=ns, lease=30)
    async def charge() -> str:
        counter.hit()
        return "receipt"

    await store.cut_short(asyncio.create_task(charge()))
    async with asyncio.timeout(10):
        await store.finished.wait()
    assert await charge() == "receipt"
    assert counter.runs == 1
    # the completion cut short, the one made again, and the repeat's claim, which finds the result
    assert store.calls == ["claim", "complete", "complete", "claim"]


# -- the default namespace does not depend on how the module was loaded (issue 14) -------------------------------------

_JOBS = """
import os
from idempo import idempotent

@idempotent(os.environ["JOBS_STORE"], key="{n}")
def charge(n: int) -> int:
    return n

if __name__ == "__main__":
    charge(1)
"""


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    package = tmp_path / "shop"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(_JOBS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "JOBS_STORE": f"sqlite:///{tmp_path / 'jobs.db'}"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_a_function_in_a_script_run_as_main_needs_an_explicit_namespace(tmp_path: Path) -> None:
    result = _run(tmp_path, "shop/jobs.py")
    assert result.returncode != 0
    assert "ConfigurationError" in result.stderr
    assert "pass namespace=" in result.stderr


def test_run_with_python_m_its_keys_are_those_an_import_gives(tmp_path: Path) -> None:
    """Run as ``python -m shop.jobs`` and imported by a worker as ``shop.jobs``: one namespace, so one record."""
    result = _run(tmp_path, "-m", "shop.jobs")
    assert result.returncode == 0, result.stderr
    imported = _run(tmp_path, "-c", "import shop.jobs; shop.jobs.charge(1); shop.jobs.charge(2)")
    assert imported.returncode == 0, imported.stderr
    store = SQLiteStore(tmp_path / "jobs.db").sync()
    try:
        assert sorted(record.key for record in store.scan()) == ["fn:shop.jobs.charge:1", "fn:shop.jobs.charge:2"]
    finally:
        store.close()
