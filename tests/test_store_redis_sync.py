"""SyncRedisStore, the blocking twin of RedisStore: the conformance suite (from real threads) against the shared
Redis, a user's own sync client and a real three-node Redis Cluster; the twins, async and sync, sharing records; and
what only the sync store does (threads, a cluster client that connects as it is made). The scenarios both stores
share (scripts, failures, URLs, eviction, a full server) are written once in ``test_store_redis.py`` and run on
each.

The shared server is never flushed: every test uses keys under a prefix of its own run, which expire by TTL.
Tests that kill, pause or flush a server start their own (``tests/support/redis_cluster.py``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
import redis.exceptions

from idempo import Acquired, ConfigurationError, Existing, State, StoreError, store_from_url
from idempo.stores import SyncStore, parse_store_url, sync_store_from_url
from idempo.stores.redis import RedisStore, SyncRedisStore
from idempo.testing import SyncStoreConformance
from tests.support.environment import with_options
from tests.support.redis_cluster import redis_cluster
from tests.support.redis_servers import nodes_of

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


# -- scripts, clusters, eviction --------------------------------------------------------------------------------------


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


def test_the_twin_has_the_stores_eviction_mode() -> None:
    store = store_from_url("redis://h?eviction=warn")
    assert isinstance(store, RedisStore)
    assert store.sync()._guard.mode == "warn"
    assert open_url("redis://h", eviction="ignore")._guard.mode == "ignore"
    assert open_url("redis://h")._guard.mode == "refuse"
