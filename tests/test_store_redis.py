"""RedisStore and its sync twin: the conformance suite against the shared Redis, a user's own client and a real
three-node Redis Cluster; and what only a Redis store promises, each scenario written once and run on both stores
(the ``twin`` fixture): Lua scripts that survive ``SCRIPT FLUSH``, one hash per record with a Redis TTL, the server's
clock, bounded failures when the server dies or hangs (and recovery when it is back), URLs, the eviction check, a
full server; and the middleware on top of the async store.

The shared server is never flushed: every test uses keys under a prefix of its own run, which expire by TTL.
Tests that kill, pause or flush a server start their own (``tests/support/redis_cluster.py``).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import idempo
from idempo import (
    Acquired,
    ConfigurationError,
    Existing,
    IdempotencyMiddleware,
    MissingDependency,
    Record,
    State,
    Store,
    StoreError,
    StoreFullError,
    store_from_url,
)
from idempo._core.plans import iterate
from idempo.stores import ScanningStore, SyncScanningStore, parse_store_url
from idempo.stores import _redis_eviction as eviction_module
from idempo.stores import _redis_operations as operations_module
from idempo.stores.redis import OOM_PAYLOAD_LIMIT, RedisStore, SyncRedisStore
from idempo.testing import StoreConformance
from tests.support.environment import REDIS_URL, with_options
from tests.support.redis_cluster import RedisServer, free_port
from tests.support.redis_servers import OOM_MARKER, config_reads, fill_up, nodes_of, set_policy
from tests.support.stores import TWINS, Twin

RUN_PREFIX = f"idempo-test-{uuid.uuid4().hex[:12]}:"
"""Every key this module writes to the shared server starts with this (and expires by TTL)."""

HANG_GUARD = 30.0
"""A generous bound on operations that must give up on their own: it catches a hang, it does not time them."""

BOUND = 10.0
"""What one operation that fails on its own may take at most (a few socket timeouts, on a loaded machine)."""

Scenario = Generator[Any, Any, None]


def prefixed(url: str, name: str = "") -> str:
    return with_options(url, prefix=f"{RUN_PREFIX}{name}")


def open_url(url: str, **options: Any) -> RedisStore:
    store = store_from_url(url, **options)
    assert isinstance(store, RedisStore)
    return store


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> Twin:
    """The async store, or its sync twin: each scenario below runs on both."""
    return Twin(request.param, guard=HANG_GUARD)


# -- the conformance suite ---------------------------------------------------------------------------------------


class _RedisConformance(StoreConformance):
    """Local servers: short real leases keep the suite quick; the server's clock is this machine's."""

    short_lease = 0.05
    short_ttl = 0.05
    expiry_margin = 0.05
    expires_on_its_own = True
    url: ClassVar[str]

    async def open_store(self) -> Store:
        return store_from_url(self.url)


class TestRedisStore(_RedisConformance):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _server(cls, redis_url: str) -> None:
        cls.url = prefixed(redis_url, "conformance:")


class TestRedisStoreWithOwnClient(_RedisConformance):
    """``RedisStore(client)``: a client the user made, and closes."""

    clients: ClassVar[dict[int, redis.asyncio.Redis]] = {}

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _server(cls, redis_url: str) -> None:
        cls.url = redis_url

    async def open_store(self) -> Store:
        client = redis.asyncio.Redis.from_url(self.url)
        store = RedisStore(client, prefix=f"{RUN_PREFIX}own-client:")
        self.clients[id(store)] = client
        return store

    async def close_store(self, store: Store) -> None:
        await store.close()
        client = self.clients.pop(id(store))
        assert await client.ping()  # the store left it open
        await client.aclose()


class TestRedisClusterStore(_RedisConformance):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _cluster(cls, redis_cluster_url: str) -> None:
        cls.url = prefixed(redis_cluster_url, "conformance:")


# -- records, keys, scripts ----------------------------------------------------------------------------------------


def test_one_hash_per_record_with_a_redis_ttl(twin: Twin, redis_url: str) -> None:
    store = twin.open(prefixed(redis_url, f"layout-{twin}:"))
    key = f"{uuid.uuid4().hex}:layout"
    raw_key = f"{RUN_PREFIX}layout-{twin}:{key}"

    def scenario() -> Scenario:
        with redis.Redis.from_url(redis_url) as raw:
            token = yield store.claim(key, "fp", lease=30, ttl=100)
            assert isinstance(token, Acquired)
            assert raw.type(raw_key) == b"hash"
            assert raw.keys(f"{RUN_PREFIX}layout-{twin}:*") == [raw_key.encode()]
            fields = raw.hgetall(raw_key)
            assert set(fields) == {
                b"state",
                b"fingerprint",
                b"token",
                b"created_at",
                b"lease_expires_at",
                b"expires_at",
            }
            assert 99_000 < raw.pttl(raw_key) <= 100_000
            assert (yield store.renew(key, token.token, lease=50))
            assert 99_000 < raw.pttl(raw_key) <= 100_000  # renew moves the lease, not the expiry
            assert (yield store.complete(key, token.token, b"done", ttl=5))
            assert 4_000 < raw.pttl(raw_key) <= 5_000
            fields = raw.hgetall(raw_key)
            assert (fields[b"state"], fields[b"token"], fields[b"payload"]) == (b"completed", b"", b"done")
            # Redis drops the key one millisecond before expires_at: at expires_at the record is expired.
            expires_at_ms = int(fields[b"expires_at"])
            assert abs(raw.pexpiretime(raw_key) - (expires_at_ms - 1)) <= 1
            assert (yield store.delete(key))
            assert raw.exists(raw_key) == 0
        yield store.close()

    twin.run(scenario())


def test_times_come_from_the_servers_clock(twin: Twin, redis_url: str) -> None:
    store = twin.open(prefixed(redis_url, "clock:"))
    key = uuid.uuid4().hex

    def scenario() -> Scenario:
        with redis.Redis.from_url(redis_url) as raw:
            seconds, micros = raw.time()
            before = seconds + micros / 1e6
            yield store.claim(key, "fp", lease=7, ttl=9)
            seconds, micros = raw.time()
            after = seconds + micros / 1e6
        record = yield store.get(key)
        assert record is not None
        assert before - 0.001 <= record.created_at <= after
        assert record.lease_expires_at == pytest.approx(record.created_at + 7)
        assert record.expires_at == pytest.approx(record.created_at + 9)
        yield store.delete(key)
        yield store.close()

    twin.run(scenario())


def test_times_are_written_as_whole_milliseconds_however_far_off(twin: Twin, redis_url: str) -> None:
    """Every time field is the decimal integer of its milliseconds, and the key expires a millisecond before
    expires_at: even for a record kept 5000 years (the scripts write times with ``string.format('%d')``)."""
    store = twin.open(prefixed(redis_url, f"times-{twin}:"))
    key = uuid.uuid4().hex
    raw_key = f"{RUN_PREFIX}times-{twin}:{key}"
    ttl = 5000 * 365 * 86_400.0  # 1.6e14 ms: fifteen digits

    def scenario() -> Scenario:
        with redis.Redis.from_url(redis_url) as raw:
            claim = yield store.claim(key, "fp", lease=ttl, ttl=ttl)
            assert isinstance(claim, Acquired)
            fields = raw.hmget(raw_key, "created_at", "lease_expires_at", "expires_at")
            assert all(value.isdigit() for value in fields), fields
            created, lease_expires, expires = (int(value) for value in fields)
            assert lease_expires - created == expires - created == round(ttl * 1000)
            assert raw.pexpiretime(raw_key) == expires - 1
            assert (yield store.renew(key, claim.token, lease=ttl))
            assert (yield store.complete(key, claim.token, b"done", ttl=ttl))
            fields = raw.hmget(raw_key, "lease_expires_at", "expires_at")
            assert all(value.isdigit() for value in fields), fields
            assert raw.pexpiretime(raw_key) == int(fields[1]) - 1
            record = yield store.get(key)
            assert record is not None
            assert record.expires_at == pytest.approx(record.lease_expires_at + ttl)
            yield store.delete(key)
        yield store.close()

    twin.run(scenario())


def test_a_claim_sent_twice_is_acquired_once(twin: Twin, redis_url: str) -> None:
    """The client draws the token, so a claim that redis-py sends again (after a lost connection) still owns."""
    store = twin.open(prefixed(redis_url, "twice:"))
    key = uuid.uuid4().hex

    def scenario() -> Scenario:
        bound = store._bound()
        claim = bound.client.register_script(bound.scripts["claim"].source)
        args: list[str | int] = ["fp", "a-token-of-ours", 30_000, 60_000]
        assert (yield claim(keys=[f"{RUN_PREFIX}twice:{key}"], args=args)) == 1
        assert (yield claim(keys=[f"{RUN_PREFIX}twice:{key}"], args=args)) == 1
        record = yield store.get(key)
        assert record is not None
        assert record.token == "a-token-of-ours"
        other = yield store.claim(key, "fp", lease=30, ttl=60)
        assert isinstance(other, Existing)  # anyone else's claim finds it held
        assert (yield store.complete(key, "a-token-of-ours", b"once", ttl=60))
        yield store.close()

    twin.run(scenario())


SPECIAL_KEYS = [
    "{",
    "}",
    "{}",
    "a{b}c",
    "{tag}:x",
    "{tag}:y",
    "ü/日本語/🙂",
    "line\nbreak\ttab",
    " leading and trailing ",
    "*?[a-z]\\",
    "idempo:nested:prefix",
    "k" * 2000,
]


@pytest.mark.parametrize("server", ["redis_url", "redis_cluster_url"])
def test_keys_with_special_characters(twin: Twin, server: str, request: pytest.FixtureRequest) -> None:
    base: str = request.getfixturevalue(server)
    store = twin.open(prefixed(base, f"special-{uuid.uuid4().hex[:8]}:"))

    def scenario() -> Scenario:
        tokens = {}
        for key in SPECIAL_KEYS:
            claim = yield store.claim(key, f"fp-{key}", lease=30, ttl=60)
            assert isinstance(claim, Acquired), key
            tokens[key] = claim.token
        for key in SPECIAL_KEYS:
            assert (yield store.complete(key, tokens[key], key.encode(), ttl=60)), key
        for key in SPECIAL_KEYS:
            record = yield store.get(key)
            assert record is not None
            assert (record.key, record.state, record.fingerprint, record.payload) == (
                key,
                State.COMPLETED,
                f"fp-{key}",
                key.encode(),
            )
            assert (yield store.delete(key))
        yield store.close()

    twin.run(scenario())


def test_scripts_are_reloaded_after_script_flush(twin: Twin, private_redis: RedisServer) -> None:
    store = twin.open(private_redis.url)

    def scenario() -> Scenario:
        claim = yield store.claim("k", "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        with private_redis.client() as admin:
            admin.script_flush()
            assert admin.script_exists(store._bound().scripts["complete"].sha) == [False]
        assert (yield store.complete("k", claim.token, b"after the flush", ttl=60))  # NOSCRIPT, loaded, run again
        with private_redis.client() as admin:
            assert admin.script_exists(store._bound().scripts["complete_at_oom"].sha) == [True]  # the digest LOAD gave
        with private_redis.client() as admin:
            admin.script_flush()
        replay = yield store.claim("k", "fp", lease=30, ttl=60)
        assert isinstance(replay, Existing)
        assert replay.record.payload == b"after the flush"
        second = yield store.claim("k2", "fp", lease=30, ttl=60)
        assert isinstance(second, Acquired)
        with private_redis.client() as admin:
            admin.script_flush()
        assert (yield store.renew("k2", second.token, lease=30))
        with private_redis.client() as admin:
            admin.script_flush()
        assert (yield store.release("k2", second.token))
        yield store.close()

    twin.run(scenario())


def test_scripts_are_reloaded_after_script_flush_on_a_cluster(twin: Twin, redis_cluster_url: str) -> None:
    store = twin.open(prefixed(redis_cluster_url, f"flush-{twin}:"))
    keys = [f"flush-{i}" for i in range(12)]  # enough keys to land on every node

    def scenario() -> Scenario:
        tokens = {}
        for key in keys:
            claim = yield store.claim(key, "fp", lease=30, ttl=60)
            assert isinstance(claim, Acquired)
            tokens[key] = claim.token
        for host, port in nodes_of(redis_cluster_url):
            with redis.Redis(host=host, port=port) as node:
                node.script_flush()
        for key in keys:
            assert (yield store.complete(key, tokens[key], b"done", ttl=60))
            assert (yield store.delete(key))
        yield store.close()

    twin.run(scenario())


# -- failures --------------------------------------------------------------------------------------------------


def test_a_killed_server_gives_store_errors_and_the_store_recovers(twin: Twin, private_redis: RedisServer) -> None:
    store = twin.open(private_redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def scenario() -> Scenario:
        claim = yield store.claim("k", "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        private_redis.kill()
        operations: dict[str, Callable[[], object]] = {
            "claim": lambda: store.claim("k", "fp", lease=30, ttl=60),
            "renew": lambda: store.renew("k", claim.token, lease=30),
            "complete": lambda: store.complete("k", claim.token, b"x", ttl=60),
            "release": lambda: store.release("k", claim.token),
            "get": lambda: store.get("k"),
            "delete": lambda: store.delete("k"),
        }
        for name, operation in operations.items():
            started = time.monotonic()
            with pytest.raises(StoreError, match=f"{name} failed") as raised:
                yield operation()
            assert time.monotonic() - started < BOUND
            assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
            assert str(private_redis.port) in str(raised.value)
        private_redis.start()  # the same port; an empty server (no persistence)
        again = yield store.claim("k", "fp", lease=30, ttl=60)
        assert isinstance(again, Acquired)
        assert (yield store.complete("k", again.token, b"after the restart", ttl=60))
        yield store.close()

    twin.run(scenario())


def test_a_hung_server_gives_store_errors_within_the_timeout(twin: Twin, private_redis: RedisServer) -> None:
    store = twin.open(with_options(private_redis.url, timeout="0.3", connect_timeout="0.3"))
    fresh = twin.open(with_options(private_redis.url, timeout="0.3", connect_timeout="0.3"))  # never connected

    def scenario() -> Scenario:
        claim = yield store.claim("k", "fp", lease=30, ttl=60)  # the pool now holds a connection
        assert isinstance(claim, Acquired)
        private_redis.pause()
        try:
            for stuck in (store, fresh):
                started = time.monotonic()
                with pytest.raises(StoreError, match="get failed") as raised:
                    yield stuck.get("k")
                assert isinstance(raised.value.__cause__, redis.exceptions.TimeoutError)
                assert 0.25 <= time.monotonic() - started < BOUND  # it waited for the reply, then gave up
        finally:
            private_redis.resume()
        assert (yield store.complete("k", claim.token, b"after the pause", ttl=60))
        record = yield fresh.get("k")
        assert record is not None
        assert record.payload == b"after the pause"
        yield store.close()
        yield fresh.close()

    twin.run(scenario())


def hanging_store(timeout: float, on_cancel: Callable[[], object] | None = None) -> RedisStore:
    """An async store whose ``HMGET`` (``get``) never answers: *on_cancel* runs when it is cancelled, and returns
    ``get``'s reply instead of letting the cancellation through if it returns something. Nothing is connected."""
    store = open_url(f"redis://127.0.0.1:{free_port()}/0?timeout={timeout}")

    async def hmget(*_: object) -> object:
        try:
            await asyncio.sleep(HANG_GUARD)
        except asyncio.CancelledError:
            reply = on_cancel() if on_cancel is not None else None
            if reply is None:
                raise
            return reply
        raise AssertionError  # pragma: no cover - never answers

    store._bound().client.hmget = hmget
    return store


async def test_commands_in_flight_each_time_out_after_their_own_timeout() -> None:
    """One timer bounds every command of a loop (``_redis_timeouts``): each still gets its own timeout, whenever
    it started, and the task goes on uncancelled."""
    store = hanging_store(0.2)

    async def get_after(delay: float) -> float:
        await asyncio.sleep(delay)
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"get failed: TimeoutError: no reply within 0\.2 s") as raised:
            await store.get("k")
        assert isinstance(raised.value.__cause__, redis.exceptions.TimeoutError)
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        return time.monotonic() - started

    async with asyncio.timeout(HANG_GUARD):
        waited = await asyncio.gather(*(get_after(0.07 * n) for n in range(4)))
        assert all(0.19 <= took < BOUND for took in waited), waited
        assert 0.19 <= await get_after(0) < BOUND  # after a pause, with no command in flight
    await store.close()


async def test_a_command_cancelled_by_its_caller_is_cancelled_not_timed_out() -> None:
    store = hanging_store(0.3)
    async with asyncio.timeout(HANG_GUARD):
        task = asyncio.create_task(store.get("k"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(TimeoutError):  # the caller's own timeout, shorter than the store's
            async with asyncio.timeout(0.05):
                await store.get("k")
    await store.close()


async def test_a_cancellation_that_meets_the_timeout_is_a_cancellation() -> None:
    """Cancelled by its caller as the store's timeout cancels it: the task is cancelled (as under
    ``asyncio.timeout``)."""

    def cancel_again() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()

    store = hanging_store(0.05, on_cancel=cancel_again)
    async with asyncio.timeout(HANG_GUARD):
        task = asyncio.create_task(store.get("k"))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
    await store.close()


async def test_a_command_that_answers_its_timeout_keeps_its_answer() -> None:
    """A command that still answers once the store's timeout cancelled it: its answer stands, and the timeout's
    cancellation is taken back."""
    fields = [b"completed", b"fp", b"", b"1000", b"1000", b"2000", b"late"]
    store = hanging_store(0.05, on_cancel=lambda: fields)
    async with asyncio.timeout(HANG_GUARD):
        record = await store.get("k")
        assert record is not None
        assert record.payload == b"late"
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        await asyncio.sleep(0)  # no cancellation left pending either
    await store.close()


def test_an_unreachable_server_gives_a_store_error(twin: Twin) -> None:
    store = twin.open(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0")

    def scenario() -> Scenario:
        with pytest.raises(StoreError, match="claim failed") as raised:
            yield store.claim("k", "fp", lease=30, ttl=60)
        assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
        assert "hunter2" not in str(raised.value)
        assert ":***@127.0.0.1" in str(raised.value)
        yield store.close()

    twin.run(scenario())


def test_an_unreachable_cluster_gives_a_store_error(twin: Twin) -> None:
    store = twin.open(f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}?timeout=0.5")

    def scenario() -> Scenario:
        with pytest.raises(StoreError, match="get failed") as raised:
            yield store.get("k")
        assert isinstance(raised.value.__cause__, redis.exceptions.RedisClusterException | redis.exceptions.RedisError)
        yield store.close()

    twin.run(scenario())


def test_passwords_never_show(twin: Twin, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, args=("--requirepass", "right-secret"))

    def scenario() -> Scenario:
        wrong = twin.open(f"redis://:wrong-secret@127.0.0.1:{server.port}/0")
        assert "wrong-secret" not in repr(wrong)
        with pytest.raises(StoreError) as raised:
            yield wrong.get("k")
        assert isinstance(raised.value.__cause__, redis.exceptions.AuthenticationError)
        assert "wrong-secret" not in str(raised.value)
        yield wrong.close()
        right = twin.open(f"redis://default:right-secret@127.0.0.1:{server.port}/0")
        assert "right-secret" not in repr(right)
        assert isinstance((yield right.claim("k", "fp", lease=30, ttl=60)), Acquired)
        yield right.close()

    try:
        server.start()
        twin.run(scenario())
    finally:
        server.kill()


# -- URLs ----------------------------------------------------------------------------------------------------


def client_options(store: Any) -> Generator[Any, Any, dict[str, Any]]:
    """The connection options of the client *store* makes (the client is closed again), and under ``"timeout"``
    what bounds each command: the async store's own bound (its client for one server has no ``socket_timeout``:
    see ``_redis_timeouts``), the sync twin's client's ``socket_timeout``."""
    bound = store._bound()
    client = bound.client
    assert isinstance(client, redis.asyncio.Redis | redis.Redis)
    options = dict(client.connection_pool.connection_kwargs)
    options["connection_class"] = client.connection_pool.connection_class
    if isinstance(store, RedisStore):
        assert options["socket_timeout"] is None
        options["timeout"] = bound.deadlines.timeout
    else:
        options["timeout"] = options["socket_timeout"]
    yield store.close()
    return options


def test_redis_url_defaults(twin: Twin) -> None:
    store = twin.open("redis://")
    assert store._prefix == "idempo:"

    def scenario() -> Scenario:
        options = yield from client_options(store)
        assert (options["host"], options["port"], options["db"]) == ("localhost", 6379, 0)
        assert (options["timeout"], options["socket_connect_timeout"]) == (2.0, 1.0)
        assert options["password"] is None
        assert options["decode_responses"] is False
        retry = options["retry"]  # once more after a connection error; never after a timeout (the server may run it)
        assert retry.get_retries() == 1
        assert set(retry._supported_errors) == {redis.exceptions.ConnectionError}

    twin.run(scenario())


def test_redis_url_with_everything(twin: Twin) -> None:
    store = twin.open("redis://app:p%40ss%3Aword@cache.internal:6380/3?prefix=myapp:&timeout=0.5&connect_timeout=0.25")
    assert store._prefix == "myapp:"
    assert "p%40ss" not in repr(store)
    assert "app:***@cache.internal" in repr(store)

    def scenario() -> Scenario:
        options = yield from client_options(store)
        assert (options["host"], options["port"], options["db"]) == ("cache.internal", 6380, 3)
        assert (options["username"], options["password"]) == ("app", "p@ss:word")
        assert (options["timeout"], options["socket_connect_timeout"]) == (0.5, 0.25)

    twin.run(scenario())


def test_keyword_options_override_the_url_and_reach_redis_py(twin: Twin) -> None:
    store = twin.open("redis://h?prefix=a:&timeout=3", prefix="b:", socket_timeout=4, max_connections=7)
    assert store._prefix == "b:"

    def scenario() -> Scenario:
        assert store._bound().client.connection_pool.max_connections == 7
        options = yield from client_options(store)
        assert options["timeout"] == 4

    twin.run(scenario())


def test_rediss_url_uses_tls(twin: Twin) -> None:
    store = twin.open("rediss://:secret@h:6390/0?ssl_cert_reqs=none&ssl_check_hostname=false")
    assert "secret" not in repr(store)

    def scenario() -> Scenario:
        options = yield from client_options(store)
        tls = redis.asyncio.connection.SSLConnection if twin.is_async else redis.connection.SSLConnection
        assert options["connection_class"] is tls
        assert options["ssl_cert_reqs"] == "none"
        assert options["ssl_check_hostname"] is False
        assert options["password"] == "secret"

    twin.run(scenario())


async def test_cluster_url_with_several_hosts() -> None:
    """The asyncio cluster client connects on first use: its nodes can be read without a cluster (the sync one
    connects as it is made: see test_store_redis_sync.py)."""
    store = open_url("redis+cluster://u:secret@node-a:7000,node-b:7001,[::1]:7002?prefix=c:&timeout=0.7")
    assert store._prefix == "c:"
    assert "secret" not in repr(store)
    client = store._bound().client
    assert isinstance(client, RedisCluster)
    assert [(node.host, node.port) for node in client.startup_nodes] == [
        ("node-a", 7000),
        ("node-b", 7001),
        ("::1", 7002),
    ]
    assert client.connection_kwargs["password"] == "secret"
    assert client.connection_kwargs["username"] == "u"
    assert client.connection_kwargs["socket_timeout"] == 0.7
    await store.close()


@pytest.mark.parametrize("kind", TWINS)
@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://:secret@h:notaport/0", {}, "not a port number"),
        ("redis://:secret@h:0/0", {}, "not a port number"),
        ("redis://:secret@h/abc", {}, "must be a number"),
        ("redis://:secret@h1:1,h2:2", {}, "redis\\+cluster"),
        ("redis+cluster://:secret@h:1/2", {}, "only database 0"),
        ("redis://:secret@h?timeout=soon", {}, "not a number"),
        ("redis://:secret@h?timeout=0", {}, "positive"),
        ("redis://:secret@h?connect_timeout=-1", {}, "positive"),
        ("redis://:secret@h?bogus=1", {}, "unknown option 'bogus'"),
        ("redis://:secret@h?ssl_cert_reqs=none", {}, "rediss://"),
        ("redis://:secret@[::1]x/0", {}, "bad address"),
        ("redis://:secret@h", {"decode_responses": True}, "decode_responses"),
        ("redis://:secret@h", {"no_such_option": 1}, "no_such_option"),
        ("redis+cluster://:secret@h:1", {"no_such_option": 1}, "RedisCluster.*no_such_option"),
        ("redis://:secret@h", {"socket_timeout": None}, "positive"),
        ("redis://:secret@h", {"prefix": 3}, "prefix must be a string"),
        ("redis://:secret@h?eviction=sometimes", {}, "eviction must be one of refuse, warn, ignore"),
        ("redis://:secret@h", {"eviction": "Refuse"}, "eviction must be one of"),
    ],
)
def test_invalid_urls_and_options(kind: str, url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        Twin(kind).open(url, **options)
    assert "secret" not in str(raised.value)


def test_missing_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingDependency, match=r"pip install 'idempo\[redis\]'"):
        store_from_url("redis://localhost")
    with pytest.raises(MissingDependency, match="redis"):
        RedisStore(lambda: None)  # type: ignore[arg-type, return-value]  # never called: redis-py is missing


async def test_a_client_that_decodes_responses_is_refused() -> None:
    client = redis.asyncio.Redis(decode_responses=True)
    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        RedisStore(client)
    await client.aclose()


# -- clients and event loops ---------------------------------------------------------------------------------------


def test_the_store_is_an_idempo_store() -> None:
    assert isinstance(open_url("redis://localhost"), idempo.Store)
    assert isinstance(open_url("redis+cluster://localhost:7000"), idempo.Store)
    assert isinstance(RedisStore(redis.asyncio.Redis()), idempo.Store)


MADE_AT_IMPORT_TIME = store_from_url(prefixed(REDIS_URL, "import-time:"))


@pytest.mark.usefixtures("redis_url")  # skips (or fails under CI=true) without a server
def test_a_store_made_before_any_loop_works_in_loops_that_come_later() -> None:
    store = MADE_AT_IMPORT_TIME

    async def use(key: str) -> None:
        claim = await store.claim(key, "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        assert await store.complete(key, claim.token, b"done", ttl=60)
        await store.close()

    asyncio.run(use(uuid.uuid4().hex))
    asyncio.run(use(uuid.uuid4().hex))  # a new loop: a new client


def test_one_store_serves_several_loops_and_closes_them_all(redis_url: str) -> None:
    store = open_url(prefixed(redis_url, "loops:"))
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()

    async def claim_and_complete(key: str) -> None:
        claim = await store.claim(key, "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        assert await store.complete(key, claim.token, key.encode(), ttl=60)

    async def main() -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(claim_and_complete("in-the-thread"), other))
        await claim_and_complete("in-main")
        assert len(store._by_loop) == 2
        await store.close()  # closes the thread loop's client in that loop
        assert store._by_loop == {}

    try:
        asyncio.run(main())
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(timeout=10)
        other.close()
    gc.collect()  # an unclosed connection would warn now, and filterwarnings=error would fail the test


def test_a_users_client_is_left_open(twin: Twin, redis_url: str) -> None:
    client: Any = (redis.asyncio.Redis if twin.is_async else redis.Redis).from_url(redis_url)
    store = (RedisStore if twin.is_async else SyncRedisStore)(client, prefix=RUN_PREFIX + "own:")
    assert repr(store) == f"{type(store).__name__}(<Redis>, prefix='{RUN_PREFIX}own:')"

    def scenario() -> Scenario:
        assert isinstance((yield store.claim("k", "fp", lease=30, ttl=60)), Acquired)
        yield store.close()
        assert (yield client.exists(f"{RUN_PREFIX}own:k")) == 1
        assert (yield store.delete("k"))
        yield client.aclose() if twin.is_async else client.close()

    twin.run(scenario())


async def test_purge_expired_has_nothing_to_do() -> None:
    assert await open_url("redis://localhost").purge_expired() == 0  # never even connects


# -- the middleware on top -----------------------------------------------------------------------------------------


async def test_middleware_runs_once_and_replays(redis_url: str) -> None:
    calls = 0

    async def create_charge(request: Request) -> Response:
        nonlocal calls
        calls += 1
        body = await request.json()
        return JSONResponse({"charge": calls, "amount": body["amount"]}, status_code=201)

    store = RedisStore.from_url(parse_store_url(prefixed(redis_url, "middleware:")))
    app = Starlette(
        routes=[Route("/charges", create_charge, methods=["POST"])],
        middleware=[Middleware(IdempotencyMiddleware, store=store)],
    )
    headers = {"Idempotency-Key": f"charge-{uuid.uuid4()}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = await client.post("/charges", json={"amount": 100}, headers=headers)
        retry = await client.post("/charges", json={"amount": 100}, headers=headers)
        reused = await client.post("/charges", json={"amount": 999}, headers=headers)
    assert (first.status_code, first.json()) == (201, {"charge": 1, "amount": 100})
    assert (retry.status_code, retry.content) == (201, first.content)
    assert retry.headers["idempotent-replayed"] == "true"
    assert reused.status_code == 422
    assert calls == 1
    await store.close()


def test_each_script_is_package_data_headed_by_its_contract() -> None:
    scripts = importlib.resources.files("idempo.stores") / "lua"
    for name in ("claim", "renew", "complete", "release"):
        text = (scripts / f"{name}.lua").read_text("utf-8")
        assert text.startswith(f"-- {name}.lua: ")
        assert "-- KEYS[1]" in text
        assert "-- ARGV[1]" in text
        assert "-- Returns" in text


# -- scan -----------------------------------------------------------------------------------------------------------


def test_redis_stores_can_scan() -> None:
    assert issubclass(RedisStore, ScanningStore)
    assert issubclass(SyncRedisStore, SyncScanningStore)


@pytest.mark.parametrize("server", ["redis_url", "redis_cluster_url"])
async def test_scan_walks_every_batch_and_every_primary(server: str, request: pytest.FixtureRequest) -> None:
    """More records than one SCAN batch, spread over the cluster's three primaries: each is listed once, by the
    store and by its sync twin; a store prefix with pattern characters is taken literally too."""
    base: str = request.getfixturevalue(server)
    run = f"{RUN_PREFIX}scan-{uuid.uuid4().hex[:8]}:"
    prefix = run + "a*?[x]"
    store = open_url(with_options(base, prefix=prefix.replace("?", "%3F").replace("[", "%5B").replace("]", "%5D")))
    assert store._prefix == prefix
    decoy = open_url(with_options(base, prefix=run + "aZZx"))  # what 'a*?[x]*' would match, unescaped
    try:
        keys = [f"k{i:03d}" for i in range(450)]
        for start in range(0, len(keys), 50):
            await asyncio.gather(*(store.claim(key, "fp", lease=60, ttl=60) for key in keys[start : start + 50]))
        await decoy.claim("k000", "fp", lease=60, ttl=60)
        found = [record.key async for record in store.scan()]
        assert sorted(found) == keys
        assert len([record async for record in store.scan("k1")]) == 100
        assert len([record async for record in store.scan(limit=201)]) == 201
        twin = store.sync()
        assert sorted(record.key for record in twin.scan()) == keys
        if server == "redis_cluster_url":
            client = twin._bound().client
            assert isinstance(client, redis.RedisCluster)
            nodes = {client.get_node_from_key(prefix + key).name for key in keys}  # type: ignore[no-untyped-call]
            assert len(nodes) == 3  # the records live on every primary, and every one was scanned
    finally:
        await store.close()
        await decoy.close()


def test_scan_skips_what_is_not_a_record(twin: Twin, redis_url: str) -> None:
    """Under the store's prefix, a hash that is not a record, or a key of another type, is not listed."""
    prefix = f"{RUN_PREFIX}scan-{uuid.uuid4().hex[:8]}:"
    store = twin.open(with_options(redis_url, prefix=prefix))

    def scenario() -> Scenario:
        yield store.claim("record", "fp", lease=60, ttl=60)
        with redis.Redis.from_url(redis_url) as admin:
            admin.hset(prefix + "other-hash", mapping={"state": "paused"})
            admin.hset(prefix + "partial", mapping={"state": "completed"})
            admin.set(prefix + "string", "x")
            admin.hset(prefix.encode() + b"\xff", mapping={"state": "in_progress"})
            for key in ("other-hash", "partial", "string"):
                admin.expire(prefix + key, 60)
            admin.expire(prefix.encode() + b"\xff", 60)
        assert [record.key for record in (yield twin.records(store.scan()))] == ["record"]
        yield store.close()

    twin.run(scenario())


def _fake_scan(replies: dict[int, tuple[Any, list[bytes]]], fields: dict[bytes, list[Any]]) -> Callable[[Any], Any]:
    """A runner for the scan plan, answering from *replies* (by cursor) and *fields* (by key)."""

    def execute(request: Any) -> Any:
        if isinstance(request, operations_module.Nodes):
            return [FakeNode("n1")]
        if isinstance(request, operations_module.ScanKeys):
            assert request.match == "p:\\*x*"
            return replies[request.cursor]
        assert isinstance(request, operations_module.Fetch)
        return [fields.get(key, [None] * 7) for key in request.keys]

    return execute


class FakeNode:
    def __init__(self, name: str) -> None:
        self.name = name


def test_scan_plan_lists_a_key_once_though_scan_returns_it_twice() -> None:
    """SCAN may return a key twice (while the server rehashes); a cluster client answers cursors by node; a key
    gone between SCAN and HMGET is skipped."""
    record = [b"completed", b"fp", b"", b"1000", b"1000", b"9000", b"payload"]
    fields = {b"p:*xa": record, b"p:*xb": record}
    replies: dict[int, tuple[Any, list[bytes]]] = {
        0: ({"n1": 7}, [b"p:*xa", b"p:*xa", b"p:*xgone"]),
        7: ({"n1": 0}, [b"p:*xb", b"p:*xa"]),
    }
    plan = operations_module.scan_plan("p:", "*x", None)
    listed = list(iterate(plan, Record, _fake_scan(replies, fields)))
    assert [record.key for record in listed] == ["*xa", "*xb"]
    assert listed[0].payload == b"payload"
    assert listed[0].expires_at == 9.0
    limited = list(iterate(operations_module.scan_plan("p:", "*x", 1), Record, _fake_scan(replies, fields)))
    assert [record.key for record in limited] == ["*xa"]


async def test_a_scan_of_an_unreachable_server_is_a_store_error() -> None:
    store = open_url(f"redis://127.0.0.1:{free_port()}?timeout=0.5&connect_timeout=0.5")
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(StoreError, match="scan failed"):
            [record async for record in store.scan()]
        with pytest.raises(StoreError, match="scan failed"):
            list(store.sync().scan())
    await store.close()


# -- a claim's token drawn by the caller ------------------------------------------------------------------------------


def test_a_claim_takes_the_token_its_caller_drew(twin: Twin, redis_url: str) -> None:
    """The middleware draws the token when it must be able to release a claim whose reply it never got."""
    store = twin.open(prefixed(redis_url, "token:"))
    key = uuid.uuid4().hex

    def scenario() -> Scenario:
        drawn = Acquired("drawn-by-the-caller")
        assert (yield store.claim(key, "fp", lease=30, ttl=60, token="drawn-by-the-caller")) == drawn
        record = yield store.get(key)
        assert record is not None
        assert record.token == "drawn-by-the-caller"
        # The claim sent again (its first reply was lost) still owns the key; anyone else's finds it held.
        assert (yield store.claim(key, "fp", lease=30, ttl=60, token="drawn-by-the-caller")) == drawn
        assert isinstance((yield store.claim(key, "fp", lease=30, ttl=60, token="another")), Existing)
        assert isinstance((yield store.claim(key, "fp", lease=30, ttl=60)), Existing)
        assert (yield store.release(key, "drawn-by-the-caller"))
        assert (yield store.get(key)) is None
        with pytest.raises(ValueError, match="must not be empty"):
            yield store.claim(key, "fp", lease=30, ttl=60, token="")
        yield store.close()

    twin.run(scenario())


# -- eviction: a server that may drop records ------------------------------------------------------------------------


@pytest.fixture
def rechecks(monkeypatch: pytest.MonkeyPatch) -> Callable[[float, float], None]:
    """Set how long a refusal and a pass hold before the store reads the policy again."""

    def set_rechecks(refused: float, passed: float) -> None:
        monkeypatch.setattr(eviction_module, "RECHECK_REFUSED", refused)
        monkeypatch.setattr(eviction_module, "RECHECK_PASSED", passed)

    return set_rechecks


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "volatile-ttl", "allkeys-random"])
def test_an_evicting_policy_refuses_claims_by_default(twin: Twin, private_redis: RedisServer, policy: str) -> None:
    store = twin.open(private_redis.url)

    def scenario() -> Scenario:
        with private_redis.client() as admin:
            set_policy(admin, policy, "10mb")
            with pytest.raises(StoreError) as raised:
                yield store.claim("k", "fp", lease=30, ttl=60)
            message = str(raised.value)
            refused = f"claim refused: {private_redis.url!r} runs maxmemory-policy {policy} with maxmemory 10485760"
            assert refused in message
            assert "set `maxmemory-policy noeviction`" in message
            assert "eviction='warn' or eviction='ignore' (?eviction=warn in the URL)" in message
            assert admin.exists("idempo:k") == 0  # nothing was claimed
        yield store.close()

    twin.run(scenario())


@pytest.mark.parametrize(("policy", "maxmemory"), [("noeviction", "10mb"), ("allkeys-lru", "0")])
def test_noeviction_or_no_limit_keeps_records_and_passes(
    twin: Twin, private_redis: RedisServer, policy: str, maxmemory: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``maxmemory 0`` is no limit: an evicting policy then never evicts."""
    with private_redis.client() as admin:
        set_policy(admin, policy, maxmemory)

    def scenario() -> Scenario:
        for eviction in ("refuse", "warn"):
            store = twin.open(with_options(private_redis.url, eviction=eviction, prefix=f"{eviction}:"))
            claim = yield store.claim("k", "fp", lease=30, ttl=60)
            assert isinstance(claim, Acquired)
            assert (yield store.complete("k", claim.token, b"done", ttl=60))
            yield store.close()

    with caplog.at_level(logging.WARNING, logger="idempo"):
        twin.run(scenario())
    assert caplog.records == []


def test_warn_logs_once_per_store_and_claims_go_ahead(
    twin: Twin, private_redis: RedisServer, caplog: pytest.LogCaptureFixture, rechecks: Callable[[float, float], None]
) -> None:
    rechecks(0, 0)  # the policy is read again before every claim: still one warning
    with private_redis.client() as admin:
        set_policy(admin, "volatile-lru", "10mb")
    store = twin.open(with_options(private_redis.url, eviction="warn"))

    def scenario() -> Scenario:
        for index in range(3):
            claim = yield store.claim(f"k{index}", "fp", lease=30, ttl=60)
            assert isinstance(claim, Acquired)
        yield store.close()

    with caplog.at_level(logging.WARNING, logger="idempo"):
        twin.run(scenario())
    (warning,) = caplog.records
    assert "eviction='warn', claims go ahead" in warning.getMessage()
    assert "maxmemory-policy volatile-lru with maxmemory 10485760" in warning.getMessage()
    assert "set `maxmemory-policy noeviction`" in warning.getMessage()


def test_ignore_never_reads_the_policy(twin: Twin, private_redis: RedisServer) -> None:
    store = twin.open(private_redis.url, eviction="ignore")

    def scenario() -> Scenario:
        with private_redis.client() as admin:
            set_policy(admin, "allkeys-lru", "10mb")
            reads = config_reads(admin)
            for index in range(3):
                assert isinstance((yield store.claim(f"k{index}", "fp", lease=30, ttl=60)), Acquired)
            assert config_reads(admin) == reads
        yield store.close()

    twin.run(scenario())


def test_a_policy_fixed_at_runtime_is_picked_up(
    twin: Twin, private_redis: RedisServer, rechecks: Callable[[float, float], None]
) -> None:
    """A refusal holds for a while without a round trip, then the policy is read again; a pass is not read again
    on every claim."""
    rechecks(3600, 3600)
    store = twin.open(private_redis.url)

    def scenario() -> Scenario:
        with private_redis.client() as admin:
            set_policy(admin, "volatile-lru", "10mb")
            reads = config_reads(admin)
            for _ in range(20):
                with pytest.raises(StoreError, match="claim refused"):
                    yield store.claim("k", "fp", lease=30, ttl=60)
            assert config_reads(admin) == reads + 1  # one read; the refusal held for the other 19 claims
            admin.config_set("maxmemory-policy", "noeviction")  # the operator fixes it
            with pytest.raises(StoreError, match="claim refused"):
                yield store.claim("k", "fp", lease=30, ttl=60)  # the refusal still holds
            rechecks(0, 3600)  # its time is up
            claim = yield store.claim("k", "fp", lease=30, ttl=60)
            assert isinstance(claim, Acquired)
            assert config_reads(admin) == reads + 2
            for index in range(20):
                assert isinstance((yield store.claim(f"more-{index}", "fp", lease=30, ttl=60)), Acquired)
            assert config_reads(admin) == reads + 2  # the pass holds
            # An evicting policy set at runtime is found at the next check: new claims are refused, but the claim
            # already taken is still completed (its operation ran: its outcome must be recorded).
            admin.config_set("maxmemory-policy", "allkeys-lru")
            rechecks(3600, 0)
            with pytest.raises(StoreError, match="runs maxmemory-policy allkeys-lru"):
                yield store.claim("new", "fp", lease=30, ttl=60)
            assert (yield store.complete("k", claim.token, b"done", ttl=60))
            assert (yield store.renew("more-0", "not-the-token", lease=30)) is False  # it reached the server
            record = yield store.get("k")
            assert record is not None
            assert record.payload == b"done"
        yield store.close()

    twin.run(scenario())


def test_without_config_the_policy_is_read_from_info(twin: Twin, tmp_path: Path) -> None:
    """Managed Redis often disables CONFIG: ``INFO memory`` tells the same."""
    args = ("--maxmemory", "10mb", "--maxmemory-policy", "volatile-lru", "--rename-command", "CONFIG", "")
    server = RedisServer(tmp_path, args=args)

    def scenario() -> Scenario:
        store = twin.open(server.url)
        with pytest.raises(StoreError) as raised:
            yield store.claim("k", "fp", lease=30, ttl=60)
        assert "runs maxmemory-policy volatile-lru with maxmemory 10485760" in str(raised.value)
        yield store.close()

    try:
        server.start()
        twin.run(scenario())
    finally:
        server.kill()


@pytest.mark.parametrize("eviction", ["refuse", "warn", "ignore"])
def test_a_policy_that_cannot_be_read_is_said(
    twin: Twin, tmp_path: Path, eviction: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A user allowed neither CONFIG nor INFO: the store cannot know, says so, and refuses unless told otherwise."""
    server = RedisServer(tmp_path)

    def scenario() -> Generator[Any, Any, str]:
        store = twin.open(f"redis://app:app-secret@127.0.0.1:{server.port}/0?eviction={eviction}")
        said = ""
        if eviction == "refuse":
            with pytest.raises(StoreError) as raised:
                yield store.claim("k", "fp", lease=30, ttl=60)
            said = str(raised.value)
        else:
            assert isinstance((yield store.claim("k", "fp", lease=30, ttl=60)), Acquired)
        yield store.close()
        return said

    try:
        server.start()
        with server.client() as admin:
            admin.acl_setuser(
                "app", enabled=True, passwords=["+app-secret"], keys=["*"], commands=["+@all", "-config", "-info"]
            )
        with caplog.at_level(logging.WARNING, logger="idempo"):
            said = twin.run(scenario()) or " ".join(record.getMessage() for record in caplog.records)
        if eviction == "ignore":
            assert said == ""
        else:
            assert "could not be read (CONFIG GET: NoPermissionError" in said
            assert "INFO memory: NoPermissionError" in said
            assert "let the store's Redis user run CONFIG GET or INFO" in said
            assert "app-secret" not in said
    finally:
        server.kill()


def test_the_policy_is_read_on_every_primary_of_a_cluster(twin: Twin, redis_cluster_url: str) -> None:
    nodes = nodes_of(redis_cluster_url)
    admins = [redis.Redis(host=host, port=port) for host, port in nodes]

    def scenario() -> Scenario:
        before = [config_reads(admin) for admin in admins]
        store = twin.open(prefixed(redis_cluster_url, f"policy-{uuid.uuid4().hex[:8]}:"))
        assert isinstance((yield store.claim("k", "fp", lease=30, ttl=60)), Acquired)
        assert [config_reads(admin) for admin in admins] == [count + 1 for count in before]
        yield store.close()
        set_policy(admins[1], "volatile-lru", "1gb")  # one primary of three evicts
        store = twin.open(prefixed(redis_cluster_url, f"policy-{uuid.uuid4().hex[:8]}:"))
        with pytest.raises(StoreError) as raised:
            yield store.claim("k", "fp", lease=30, ttl=60)
        host, port = nodes[1]
        said = str(raised.value).partition("claim refused: ")[2]  # after the store's URL, which names every node
        assert said.startswith(f"{host}:{port} runs maxmemory-policy volatile-lru with maxmemory 1073741824 bytes.")
        assert all(f":{other}" not in said for _, other in nodes[::2])
        yield store.close()

    try:
        twin.run(scenario())
    finally:
        set_policy(admins[1], "noeviction", "0")
        for admin in admins:
            admin.close()


# -- a full server (maxmemory under noeviction) ---------------------------------------------------------------------


def test_a_full_server_starts_nothing_new_but_records_what_ran(twin: Twin, private_redis: RedisServer) -> None:
    """At maxmemory: claims (of a new key, or taking over a stale one) and large completes are refused, while a
    small complete (the middleware's "not stored" marker), a renewal, a release and replays go through, even when
    the server has to load their scripts again."""
    store = twin.open(private_redis.url)

    def scenario() -> Scenario:
        running = yield store.claim("running", "fp", lease=30, ttl=60)
        failed = yield store.claim("failed", "fp", lease=30, ttl=60)
        stale = yield store.claim("stale", "fp", lease=0, ttl=60)  # its lease has run out: any claim takes it over
        assert isinstance(running, Acquired)
        assert isinstance(failed, Acquired)
        assert isinstance(stale, Acquired)
        fill_up(private_redis)
        with private_redis.client() as admin:
            admin.script_flush()
        for key in ("new", "stale"):
            with pytest.raises(StoreFullError, match="claim failed: OutOfMemoryError") as raised:
                yield store.claim(key, "fp", lease=30, ttl=60)
            assert isinstance(raised.value.__cause__, redis.exceptions.OutOfMemoryError)
        assert (yield store.get("new")) is None
        record = yield store.get("stale")
        assert record is not None
        assert (record.state, record.token) == (State.IN_PROGRESS, stale.token)  # untouched
        assert (yield store.renew("running", running.token, lease=30))
        large = b"r" * (OOM_PAYLOAD_LIMIT + 1)
        with pytest.raises(StoreFullError, match="complete failed: OutOfMemoryError"):
            yield store.complete("running", running.token, large, ttl=60)
        assert (yield store.complete("running", running.token, OOM_MARKER, ttl=60))
        record = yield store.get("running")
        assert record is not None
        assert (record.state, record.payload) == (State.COMPLETED, OOM_MARKER)
        replay = yield store.claim("running", "fp", lease=30, ttl=60)
        assert isinstance(replay, Existing)
        assert replay.record.payload == OOM_MARKER
        assert (yield store.release("failed", failed.token))
        assert (yield store.get("failed")) is None
        yield store.close()

    twin.run(scenario())


def test_a_server_without_script_flags_gets_the_plain_scripts(
    twin: Twin, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis 6 cannot compile a shebang ("Error compiling script"): renew and the small complete then run the
    plain scripts, and at maxmemory they fail like the others. (Redis 7 answers the same error to a header that is
    no shebang, which stands in for Redis 6 here.)"""
    monkeypatch.setattr(operations_module, "_ALLOW_OOM", "#\n")
    store = twin.open(private_redis.url)

    def scenario() -> Scenario:
        claim = yield store.claim("k", "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        assert (yield store.renew("k", claim.token, lease=30))
        assert (yield store.complete("k", claim.token, OOM_MARKER, ttl=60))
        scripts = store._bound().scripts
        assert scripts["renew_at_oom"] is scripts["renew"]
        assert scripts["complete_at_oom"] is scripts["complete"]
        other = yield store.claim("other", "fp", lease=30, ttl=60)
        assert isinstance(other, Acquired)
        fill_up(private_redis)
        with pytest.raises(StoreFullError, match="complete failed: OutOfMemoryError"):
            yield store.complete("other", other.token, OOM_MARKER, ttl=60)
        yield store.close()

    with caplog.at_level(logging.WARNING, logger="idempo"):
        twin.run(scenario())
    (warning,) = caplog.records
    assert "does not take script flags (Redis < 7)" in warning.getMessage()


async def test_the_middleware_on_a_server_that_fills_up_during_a_request(private_redis: RedisServer) -> None:
    """The server fills up while a request runs: its response cannot be stored, so the middleware records the
    "not stored" marker and the retry gets a 410 instead of a second run; a new key gets a 503, and runs nothing."""
    calls = 0

    async def pay(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if request.headers["idempotency-key"] == "first":
            fill_up(private_redis)
        return JSONResponse({"paid": calls, "receipt": "r" * 500})

    store = open_url(private_redis.url)
    app = Starlette(
        routes=[Route("/pay", pay, methods=["POST"])],
        middleware=[Middleware(IdempotencyMiddleware, store=store)],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = await client.post("/pay", json={}, headers={"Idempotency-Key": "first"})
        retry = await client.post("/pay", json={}, headers={"Idempotency-Key": "first"})
        other = await client.post("/pay", json={}, headers={"Idempotency-Key": "other"})
    assert (first.status_code, first.json()["paid"]) == (200, 1)
    assert retry.status_code == 410
    assert retry.headers["content-type"] == "application/problem+json"
    assert retry.json()["type"].endswith("response-not-stored")
    assert other.status_code == 503
    assert calls == 1
    await store.close()
