"""SyncRedisStore, the blocking twin of RedisStore: the conformance suite (from real threads) against the shared
Redis, a user's own sync client and a real three-node Redis Cluster; the same scripts surviving ``SCRIPT FLUSH``;
bounded failures and recovery; URLs and options; and the twins, async and sync, sharing records.

The shared server is never flushed: every test uses keys under a prefix of its own run, which expire by TTL.
Tests that kill, pause or flush a server start their own (``tests/redis_cluster.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
import redis.exceptions
from redis.connection import SSLConnection

from idempo import Acquired, ConfigurationError, Existing, State, StoreError, StoreFullError, store_from_url
from idempo.stores import SyncStore, parse_store_url, sync_store_from_url
from idempo.stores import _redis_eviction as eviction_module
from idempo.stores.redis import OOM_PAYLOAD_LIMIT, RedisStore, SyncRedisStore
from idempo.testing import SyncStoreConformance

from .conftest import with_options
from .redis_cluster import RedisServer, free_port, redis_cluster
from .redis_support import OOM_MARKER, config_reads, fill_up, nodes_of, set_policy

RUN_PREFIX = f"idempo-test-sync-{uuid.uuid4().hex[:12]}:"
"""Every key this module writes to the shared server starts with this (and expires by TTL)."""

BOUND = 10.0
"""A generous bound on operations that must give up on their own: it catches a hang, it does not time them."""


def prefixed(url: str, name: str = "") -> str:
    return with_options(url, prefix=f"{RUN_PREFIX}{name}")


def open_url(url: str, **options: Any) -> SyncRedisStore:
    store = sync_store_from_url(url, **options)
    assert isinstance(store, SyncRedisStore)
    return store


def connected(store: SyncRedisStore) -> bool:
    """Whether *store* holds a client now."""
    return store._shared is not None


# -- the conformance suite, from real threads ----------------------------------------------------------------------


class _SyncRedisConformance(SyncStoreConformance):
    """Local servers: short real leases keep the suite quick; the server's clock is this machine's."""

    short_lease = 0.05
    short_ttl = 0.05
    expiry_margin = 0.05
    expires_on_its_own = True
    url: ClassVar[str]

    def open_sync_store(self) -> SyncStore:
        return sync_store_from_url(self.url)


class TestSyncRedisStore(_SyncRedisConformance):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _server(cls, redis_url: str) -> None:
        cls.url = prefixed(redis_url, "conformance:")


class TestSyncRedisStoreWithOwnClient(_SyncRedisConformance):
    """``SyncRedisStore(client)``: a sync client the user made, and closes."""

    clients: ClassVar[dict[int, redis.Redis]] = {}

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _server(cls, redis_url: str) -> None:
        cls.url = redis_url

    def open_sync_store(self) -> SyncStore:
        client = redis.Redis.from_url(self.url)
        store = SyncRedisStore(client, prefix=f"{RUN_PREFIX}own-client:")
        self.clients[id(store)] = client
        return store

    async def close_store(self, store: Any) -> None:
        await store.close()
        client = self.clients.pop(id(store.sync))
        assert await asyncio.to_thread(client.ping)  # the store left it open
        client.close()


class TestSyncRedisClusterStore(_SyncRedisConformance):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _cluster(cls, redis_cluster_url: str) -> None:
        cls.url = prefixed(redis_cluster_url, "conformance:")


# -- the twins -------------------------------------------------------------------------------------------------------


async def test_async_and_sync_twins_see_each_others_records(redis_url: str) -> None:
    store = store_from_url(prefixed(redis_url, "twins:"))
    assert isinstance(store, RedisStore)
    twin = store.sync()
    assert isinstance(twin, SyncRedisStore)
    assert store.sync() is twin  # one twin per store
    assert repr(twin) == repr(store).replace("RedisStore", "SyncRedisStore", 1)
    key = uuid.uuid4().hex
    claim = await store.claim(key, "fp", lease=30, ttl=60)
    assert isinstance(claim, Acquired)
    held = await asyncio.to_thread(twin.claim, key, "fp", lease=30, ttl=60)
    assert isinstance(held, Existing)
    assert held.record.token == claim.token
    assert await asyncio.to_thread(twin.complete, key, claim.token, b"from the sync twin", ttl=60)
    record = await store.get(key)
    assert record is not None
    assert (record.state, record.payload) == (State.COMPLETED, b"from the sync twin")
    other = uuid.uuid4().hex
    sync_claim = twin.claim(other, "fp", lease=30, ttl=60)  # blocking in the loop's thread: one round trip
    assert isinstance(sync_claim, Acquired)
    assert await store.complete(other, sync_claim.token, b"from the async store", ttl=60)
    sync_record = twin.get(other)
    assert sync_record is not None
    assert sync_record.payload == b"from the async store"
    assert twin.delete(other)
    assert await store.get(other) is None
    assert await store.delete(key)
    assert connected(twin)
    await store.close()  # closes the twin's connections too
    assert not connected(twin)
    assert twin.get(key) is None  # a closed twin makes a new client when used again
    twin.close()


async def test_the_twin_of_a_cluster_store(redis_cluster_url: str) -> None:
    store = store_from_url(prefixed(redis_cluster_url, "twins:"))
    assert isinstance(store, RedisStore)
    twin = store.sync()
    keys = [f"twin-{i}" for i in range(12)]
    for key in keys:
        claim = await asyncio.to_thread(twin.claim, key, "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        assert await store.complete(key, claim.token, key.encode(), ttl=60)
        record = await asyncio.to_thread(twin.get, key)
        assert record is not None
        assert record.payload == key.encode()
        assert await store.delete(key)
    await store.close()


async def test_a_store_over_a_users_async_client_has_no_sync_twin() -> None:
    client = redis.asyncio.Redis()
    store = RedisStore(client)
    with pytest.raises(ConfigurationError, match=r"SyncRedisStore\(redis\.Redis"):
        store.sync()
    factory_store = RedisStore(lambda: client)
    with pytest.raises(ConfigurationError, match="sync client"):
        factory_store.sync()
    await client.aclose()


def test_the_twin_is_checked_for_the_sync_client() -> None:
    """A keyword that only the asyncio client knows fails when the twin is made, not in its first request."""
    store = RedisStore.from_url(parse_store_url("redis://h"))
    store._factory.config.options["no_such_sync_option"] = 1  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="no_such_sync_option"):
        store.sync()


def test_sync_store_from_url_opens_a_sync_redis_store() -> None:
    for url in ("redis://localhost", "rediss://localhost", "redis+cluster://localhost:7000,localhost:7001"):
        store = sync_store_from_url(url)  # never connects
        assert isinstance(store, SyncRedisStore)
        assert isinstance(store, SyncStore)
        assert not asyncio.iscoroutinefunction(store.claim)
        assert store.purge_expired() == 0
        store.close()


def test_clients_of_the_other_api_are_refused() -> None:
    sync_client = redis.Redis()
    with pytest.raises(ConfigurationError, match="use SyncRedisStore"):
        RedisStore(sync_client)  # type: ignore[arg-type]
    sync_client.close()
    async_client = redis.asyncio.Redis()
    with pytest.raises(ConfigurationError, match="use RedisStore"):
        SyncRedisStore(async_client)  # type: ignore[arg-type]
    decoding = redis.Redis(decode_responses=True)
    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        SyncRedisStore(decoding)
    decoding.close()
    asyncio.run(async_client.aclose())


def test_a_users_client_is_left_open(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        store = SyncRedisStore(client, prefix=RUN_PREFIX + "own:")
        assert repr(store) == f"SyncRedisStore(<Redis>, prefix='{RUN_PREFIX}own:')"
        assert isinstance(store.claim("k", "fp", lease=30, ttl=60), Acquired)
        store.close()
        assert client.exists(f"{RUN_PREFIX}own:k") == 1
        assert store.delete("k")


def test_one_store_from_many_threads(redis_url: str) -> None:
    store = open_url(prefixed(redis_url, "threads:"))
    key = uuid.uuid4().hex
    results: list[object] = []
    barrier = threading.Barrier(32)

    def claim() -> None:
        barrier.wait()
        results.append(store.claim(key, "fp", lease=30, ttl=60))

    threads = [threading.Thread(target=claim) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=BOUND)
    assert len(results) == 32
    assert sum(isinstance(result, Acquired) for result in results) == 1
    assert store.delete(key)
    store.close()


# -- scripts -------------------------------------------------------------------------------------------------------


def test_one_hash_per_record_with_a_redis_ttl(redis_url: str) -> None:
    store = open_url(prefixed(redis_url, "layout:"))
    key = f"{uuid.uuid4().hex}:layout"
    raw_key = f"{RUN_PREFIX}layout:{key}"
    with redis.Redis.from_url(redis_url) as raw:
        claim = store.claim(key, "fp", lease=30, ttl=100)
        assert isinstance(claim, Acquired)
        assert raw.type(raw_key) == b"hash"
        assert 99_000 < raw.pttl(raw_key) <= 100_000
        assert store.complete(key, claim.token, b"done", ttl=5)
        fields = raw.hgetall(raw_key)
        assert (fields[b"state"], fields[b"token"], fields[b"payload"]) == (b"completed", b"", b"done")
        assert 4_000 < raw.pttl(raw_key) <= 5_000
        assert store.delete(key)
        assert raw.exists(raw_key) == 0
    store.close()


def test_scripts_are_reloaded_after_script_flush(private_redis: RedisServer) -> None:
    store = open_url(private_redis.url)
    claim = store.claim("k", "fp", lease=30, ttl=60)
    assert isinstance(claim, Acquired)
    with private_redis.client() as admin:
        admin.script_flush()
        assert admin.script_exists(store._bound().scripts["complete"].sha) == [False]
    assert store.complete("k", claim.token, b"after the flush", ttl=60)  # NOSCRIPT, loaded, run again
    with private_redis.client() as admin:
        admin.script_flush()
    replay = store.claim("k", "fp", lease=30, ttl=60)
    assert isinstance(replay, Existing)
    assert replay.record.payload == b"after the flush"
    second = store.claim("k2", "fp", lease=30, ttl=60)
    assert isinstance(second, Acquired)
    with private_redis.client() as admin:
        admin.script_flush()
    assert store.renew("k2", second.token, lease=30)
    with private_redis.client() as admin:
        admin.script_flush()
    assert store.release("k2", second.token)
    store.close()


def test_the_same_scripts_as_the_async_store(redis_url: str) -> None:
    sync = open_url(prefixed(redis_url, "scripts:"))
    store = store_from_url(prefixed(redis_url, "scripts:"))
    assert isinstance(store, RedisStore)

    async def async_shas() -> dict[str, str]:
        shas = {name: script.sha for name, script in store._bound().scripts.items()}
        await store.close()
        return shas

    sync_shas = {name: script.sha for name, script in sync._bound().scripts.items()}
    assert sync_shas == asyncio.run(async_shas())
    assert set(sync_shas) == {"claim", "renew", "complete", "release", "renew_at_oom", "complete_at_oom"}
    sync.close()


def test_scripts_are_reloaded_after_script_flush_on_a_cluster(redis_cluster_url: str) -> None:
    store = open_url(prefixed(redis_cluster_url, "flush:"))
    keys = [f"flush-{i}" for i in range(12)]  # enough keys to land on every node
    tokens = {}
    for key in keys:
        claim = store.claim(key, "fp", lease=30, ttl=60)
        assert isinstance(claim, Acquired)
        tokens[key] = claim.token
    for host, port in nodes_of(redis_cluster_url):
        with redis.Redis(host=host, port=port) as node:
            node.script_flush()
    for key in keys:
        assert store.complete(key, tokens[key], b"done", ttl=60)
        assert store.delete(key)
    store.close()


# -- failures --------------------------------------------------------------------------------------------------


def test_a_killed_server_gives_store_errors_and_the_store_recovers(private_redis: RedisServer) -> None:
    store = open_url(private_redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    claim = store.claim("k", "fp", lease=30, ttl=60)
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
            operation()
        assert time.monotonic() - started < BOUND
        assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
        assert str(private_redis.port) in str(raised.value)
    private_redis.start()  # the same port; an empty server (no persistence)
    again = store.claim("k", "fp", lease=30, ttl=60)
    assert isinstance(again, Acquired)
    assert store.complete("k", again.token, b"after the restart", ttl=60)
    store.close()


def test_a_hung_server_gives_store_errors_within_the_timeout(private_redis: RedisServer) -> None:
    store = open_url(with_options(private_redis.url, timeout="0.3", connect_timeout="0.3"))
    claim = store.claim("k", "fp", lease=30, ttl=60)  # the pool now holds a connection
    assert isinstance(claim, Acquired)
    fresh = open_url(with_options(private_redis.url, timeout="0.3", connect_timeout="0.3"))  # never connected
    private_redis.pause()
    try:
        for stuck in (store, fresh):
            started = time.monotonic()
            with pytest.raises(StoreError, match="get failed") as raised:
                stuck.get("k")
            elapsed = time.monotonic() - started
            assert isinstance(raised.value.__cause__, redis.exceptions.TimeoutError)
            assert 0.25 <= elapsed < BOUND  # it waited for the reply, then gave up
    finally:
        private_redis.resume()
    assert store.complete("k", claim.token, b"after the pause", ttl=60)
    record = fresh.get("k")
    assert record is not None
    assert record.payload == b"after the pause"
    store.close()
    fresh.close()


def test_an_unreachable_server_gives_a_store_error() -> None:
    store = open_url(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError, match="claim failed") as raised:
        store.claim("k", "fp", lease=30, ttl=60)
    assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
    assert "hunter2" not in str(raised.value)
    assert ":***@127.0.0.1" in str(raised.value)
    store.close()


def test_an_unreachable_cluster_gives_a_store_error_and_the_store_recovers(tmp_path: Path) -> None:
    """A sync RedisCluster connects as it is made: that failure is a StoreError, and the next call tries again."""
    with redis_cluster(tmp_path) as url:
        nodes = url.removeprefix("redis+cluster://")
    store = open_url(f"redis+cluster://{nodes}?timeout=0.5&connect_timeout=0.5")  # the cluster is gone
    started = time.monotonic()
    with pytest.raises(StoreError, match="get failed") as raised:
        store.get("k")
    assert time.monotonic() - started < BOUND
    assert isinstance(raised.value.__cause__, redis.exceptions.RedisClusterException | redis.exceptions.RedisError)
    assert not connected(store)
    store.close()


def test_passwords_never_show(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, args=("--requirepass", "right-secret"))
    try:
        server.start()
        wrong = open_url(f"redis://:wrong-secret@127.0.0.1:{server.port}/0")
        assert "wrong-secret" not in repr(wrong)
        with pytest.raises(StoreError) as raised:
            wrong.get("k")
        assert isinstance(raised.value.__cause__, redis.exceptions.AuthenticationError)
        assert "wrong-secret" not in str(raised.value)
        wrong.close()
        right = open_url(f"redis://default:right-secret@127.0.0.1:{server.port}/0")
        assert isinstance(right.claim("k", "fp", lease=30, ttl=60), Acquired)
        right.close()
    finally:
        server.kill()


# -- URLs: the same parsing as the async store ---------------------------------------------------------------------


def client_of(store: SyncRedisStore) -> dict[str, Any]:
    """The connection options of the client *store* makes (the client is closed again)."""
    client = store._bound().client
    assert isinstance(client, redis.Redis)
    options = dict(client.connection_pool.connection_kwargs)
    options["connection_class"] = client.connection_pool.connection_class
    store.close()
    return options


def test_redis_url_defaults() -> None:
    store = open_url("redis://")
    assert store._prefix == "idempo:"
    options = client_of(store)
    assert (options["host"], options["port"], options["db"]) == ("localhost", 6379, 0)
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (2.0, 1.0)
    assert options["password"] is None
    assert options["decode_responses"] is False
    retry = options["retry"]  # once more after a connection error; never after a timeout (the server may run it)
    assert retry.get_retries() == 1
    assert set(retry._supported_errors) == {redis.exceptions.ConnectionError}


def test_redis_url_with_everything() -> None:
    store = open_url("redis://app:p%40ss%3Aword@cache.internal:6380/3?prefix=myapp:&timeout=0.5&connect_timeout=0.25")
    assert store._prefix == "myapp:"
    assert "p%40ss" not in repr(store)
    assert "app:***@cache.internal" in repr(store)
    options = client_of(store)
    assert (options["host"], options["port"], options["db"]) == ("cache.internal", 6380, 3)
    assert (options["username"], options["password"]) == ("app", "p@ss:word")
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (0.5, 0.25)


def test_keyword_options_override_the_url_and_reach_redis_py() -> None:
    store = open_url("redis://h?prefix=a:&timeout=3", prefix="b:", socket_timeout=4, max_connections=7)
    assert store._prefix == "b:"
    client = store._bound().client
    assert isinstance(client, redis.Redis)
    assert client.connection_pool.max_connections == 7
    assert client_of(store)["socket_timeout"] == 4


def test_rediss_url_uses_tls() -> None:
    store = open_url("rediss://:secret@h:6390/0?ssl_cert_reqs=none&ssl_check_hostname=false")
    assert "secret" not in repr(store)
    options = client_of(store)
    assert options["connection_class"] is SSLConnection
    assert options["ssl_cert_reqs"] == "none"
    assert options["ssl_check_hostname"] is False
    assert options["password"] == "secret"


def test_cluster_url_reaches_the_cluster_client(redis_cluster_url: str) -> None:
    store = open_url(with_options(redis_cluster_url, prefix="c:", timeout="0.7"))
    client = store._bound().client
    assert isinstance(client, redis.RedisCluster)
    assert [(node.host, node.port) for node in client.startup_nodes] == nodes_of(redis_cluster_url)
    node = client.get_default_node().redis_connection  # type: ignore[no-untyped-call]
    assert node is not None
    assert node.connection_pool.connection_kwargs["socket_timeout"] == 0.7
    assert client.retry.get_retries() == 1
    store.close()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://:secret@h:notaport/0", {}, "not a port number"),
        ("redis://:secret@h/abc", {}, "must be a number"),
        ("redis://:secret@h1:1,h2:2", {}, "redis\\+cluster"),
        ("redis+cluster://:secret@h:1/2", {}, "only database 0"),
        ("redis://:secret@h?timeout=0", {}, "positive"),
        ("redis://:secret@h?bogus=1", {}, "unknown option 'bogus'"),
        ("redis://:secret@h?ssl_cert_reqs=none", {}, "rediss://"),
        ("redis://:secret@h", {"decode_responses": True}, "decode_responses"),
        ("redis://:secret@h", {"no_such_option": 1}, "no_such_option"),
        ("redis+cluster://:secret@h:1", {"no_such_option": 1}, "RedisCluster.*no_such_option"),
        ("redis://:secret@h", {"prefix": 3}, "prefix must be a string"),
        ("redis://:secret@h?eviction=never", {}, "eviction must be one of refuse, warn, ignore"),
    ],
)
def test_invalid_urls_and_options(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        sync_store_from_url(url, **options)
    assert "secret" not in str(raised.value)


# -- a claim's token drawn by the caller; eviction; a full server ----------------------------------------------------


def test_a_claim_takes_the_token_its_caller_drew(redis_url: str) -> None:
    store = open_url(prefixed(redis_url, "token:"))
    key = uuid.uuid4().hex
    assert store.claim(key, "fp", lease=30, ttl=60, token="drawn-by-the-caller") == Acquired("drawn-by-the-caller")
    assert store.claim(key, "fp", lease=30, ttl=60, token="drawn-by-the-caller") == Acquired("drawn-by-the-caller")
    assert isinstance(store.claim(key, "fp", lease=30, ttl=60), Existing)
    assert store.release(key, "drawn-by-the-caller")
    with pytest.raises(ValueError, match="must not be empty"):
        store.claim(key, "fp", lease=30, ttl=60, token="")
    store.close()


def test_the_twin_has_the_stores_eviction_mode() -> None:
    store = store_from_url("redis://h?eviction=warn")
    assert isinstance(store, RedisStore)
    assert store.sync()._guard.mode == "warn"
    assert open_url("redis://h", eviction="ignore")._guard.mode == "ignore"
    assert open_url("redis://h")._guard.mode == "refuse"


def test_an_evicting_policy_refuses_claims_until_it_is_fixed(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eviction_module, "RECHECK_REFUSED", 3600)
    monkeypatch.setattr(eviction_module, "RECHECK_PASSED", 3600)
    with private_redis.client() as admin:
        set_policy(admin, "volatile-lru", "10mb")
        reads = config_reads(admin)
        store = open_url(private_redis.url)
        for _ in range(5):
            with pytest.raises(StoreError) as raised:
                store.claim("k", "fp", lease=30, ttl=60)
            assert "runs maxmemory-policy volatile-lru with maxmemory 10485760 bytes" in str(raised.value)
            assert "set `maxmemory-policy noeviction`" in str(raised.value)
        assert config_reads(admin) == reads + 1
        warned = open_url(private_redis.url, eviction="warn")
        with caplog.at_level(logging.WARNING, logger="idempo"):
            assert isinstance(warned.claim("w1", "fp", lease=30, ttl=60), Acquired)
            assert isinstance(warned.claim("w2", "fp", lease=30, ttl=60), Acquired)
        (warning,) = caplog.records
        assert "maxmemory-policy volatile-lru" in warning.getMessage()
        admin.config_set("maxmemory-policy", "noeviction")
        monkeypatch.setattr(eviction_module, "RECHECK_REFUSED", 0)
        assert isinstance(store.claim("k", "fp", lease=30, ttl=60), Acquired)
        assert isinstance(store.claim("k2", "fp", lease=30, ttl=60), Acquired)
        assert config_reads(admin) == reads + 3  # the warned store's one read, the refused store's two
    store.close()
    warned.close()


def test_the_policy_is_read_on_every_primary_of_a_cluster(redis_cluster_url: str) -> None:
    nodes = nodes_of(redis_cluster_url)
    admins = [redis.Redis(host=host, port=port) for host, port in nodes]
    try:
        before = [config_reads(admin) for admin in admins]
        store = open_url(prefixed(redis_cluster_url, f"policy-{uuid.uuid4().hex[:8]}:"))
        assert isinstance(store.claim("k", "fp", lease=30, ttl=60), Acquired)
        assert [config_reads(admin) for admin in admins] == [count + 1 for count in before]
        store.close()
        set_policy(admins[2], "allkeys-lru", "1gb")
        store = open_url(prefixed(redis_cluster_url, f"policy-{uuid.uuid4().hex[:8]}:"))
        with pytest.raises(StoreError) as raised:
            store.claim("k", "fp", lease=30, ttl=60)
        host, port = nodes[2]
        said = str(raised.value).partition("claim refused: ")[2]
        assert said.startswith(f"{host}:{port} runs maxmemory-policy allkeys-lru with maxmemory 1073741824 bytes.")
        store.close()
    finally:
        set_policy(admins[2], "noeviction", "0")
        for admin in admins:
            admin.close()


def test_a_full_server_starts_nothing_new_but_records_what_ran(private_redis: RedisServer) -> None:
    """See the async store's test of the same name."""
    store = open_url(private_redis.url)
    running = store.claim("running", "fp", lease=30, ttl=60)
    failed = store.claim("failed", "fp", lease=30, ttl=60)
    stale = store.claim("stale", "fp", lease=0, ttl=60)
    assert isinstance(running, Acquired)
    assert isinstance(failed, Acquired)
    assert isinstance(stale, Acquired)
    fill_up(private_redis)
    with private_redis.client() as admin:
        admin.script_flush()
    for key in ("new", "stale"):
        with pytest.raises(StoreFullError, match="claim failed: OutOfMemoryError") as raised:
            store.claim(key, "fp", lease=30, ttl=60)
        assert isinstance(raised.value.__cause__, redis.exceptions.OutOfMemoryError)
    assert store.get("new") is None
    record = store.get("stale")
    assert record is not None
    assert (record.state, record.token) == (State.IN_PROGRESS, stale.token)
    assert store.renew("running", running.token, lease=30)
    with pytest.raises(StoreFullError, match="complete failed: OutOfMemoryError"):
        store.complete("running", running.token, b"r" * (OOM_PAYLOAD_LIMIT + 1), ttl=60)
    assert store.complete("running", running.token, OOM_MARKER, ttl=60)
    record = store.get("running")
    assert record is not None
    assert (record.state, record.payload) == (State.COMPLETED, OOM_MARKER)
    replay = store.claim("running", "fp", lease=30, ttl=60)
    assert isinstance(replay, Existing)
    assert replay.record.payload == OOM_MARKER
    assert store.release("failed", failed.token)
    assert store.get("failed") is None
    store.close()
