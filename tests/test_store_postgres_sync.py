"""SyncPostgresStore against a real PostgreSQL server: the conformance suite from real threads, its async twin on the
same table, and its URL. The scenarios it shares with PostgresStore (races, a terminated backend, a server that does
not answer or cannot be reached, purges, closing) are written once in ``test_store_postgres.py`` and run on each.

Every test uses a table of its own, with a name unique to the run, and drops it at the end.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import ClassVar

import pytest

from idempo import Acquired, Existing, StoreError
from idempo.stores import SyncStore, sync_store_from_url
from idempo.stores.postgres import PostgresStore, SyncPostgresStore
from idempo.testing import SyncStoreConformance
from tests.support.environment import with_options
from tests.support.stores import drop_table, new_table, record_of, token_of

# -- the conformance suite, from real threads ------------------------------------------------------------------------


class TestSyncPostgresStore(SyncStoreConformance):
    short_lease = 0.1
    short_ttl = 0.1
    expiry_margin = 0.1
    url: ClassVar[str]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _table_of_the_class(cls, postgres_url: str) -> Iterator[None]:
        name = new_table()
        cls.url = with_options(postgres_url, table=name)
        yield
        drop_table(postgres_url, name)

    def open_sync_store(self) -> SyncStore:
        return sync_store_from_url(self.url)


class TestSyncPostgresStoreUnprepared(TestSyncPostgresStore):
    """``prepare=false``, ``min_size=0``: as behind PgBouncer in transaction mode."""

    def open_sync_store(self) -> SyncStore:
        return sync_store_from_url(with_options(self.url, prepare="false", min_size=0))


# -- the async twin ----------------------------------------------------------------------------------------------------


async def test_async_and_sync_twins_see_each_others_records(postgres_url: str, table: str) -> None:
    store = PostgresStore(postgres_url, table=table, application_name="idempo-twins", max_size=3, statement_timeout=4)
    try:
        twin = store.sync()
        assert isinstance(twin, SyncPostgresStore)
        assert twin is store.sync()
        assert repr(twin) == repr(store).replace("PostgresStore", "SyncPostgresStore", 1)
        assert twin._options == store._options
        assert twin._application_name == "idempo-twins"
        # Blocking calls inside the loop's thread are fine here: the sync store never touches the loop.
        token = token_of(await store.claim("a", "fp", lease=60, ttl=60))
        assert record_of(twin.claim("a", "fp", lease=60, ttl=60)).token == token
        assert twin.complete("a", token, b"from async's claim", ttl=60)
        assert record_of(await store.claim("a", "fp", lease=60, ttl=60)).payload == b"from async's claim"

        token = token_of(twin.claim("b", "fp", lease=60, ttl=60))
        assert record_of(await store.claim("b", "other", lease=60, ttl=60)).fingerprint == "fp"
        assert await store.renew("b", token, lease=120)
        assert await store.complete("b", token, b"from sync's claim", ttl=60)
        got = twin.get("b")
        assert got is not None
        assert got.payload == b"from sync's claim"
        assert twin.delete("b")
        assert await store.get("b") is None
    finally:
        await store.close()
    with pytest.raises(StoreError, match="closed"):
        twin.get("a")  # closed with its async store
    with pytest.raises(StoreError, match="closed"):
        store.sync()


def test_sync_store_from_url(postgres_url: str, table: str) -> None:
    url = with_options(postgres_url, table=table, statement_timeout=3, max_size=4, prepare="false")
    store = sync_store_from_url(url)
    try:
        assert isinstance(store, SyncPostgresStore)
        assert store._table == table
        assert store._statement_timeout == 3.0
        assert store._max_size == 4
        assert store._prepare is False
        assert isinstance(store.claim("k", "fp", lease=60, ttl=60), Acquired)
        assert isinstance(store.claim("k", "fp", lease=60, ttl=60), Existing)
    finally:
        store.close()
    assert isinstance(sync_store_from_url("postgres://db/app"), SyncPostgresStore)  # never opened: nothing to close


# -- failures and recovery ---------------------------------------------------------------------------------------------


# -- a fork: gunicorn --preload opens the store in the master, then forks its workers ----------------------------------

_FORKING = """
import asyncio, os, sys
from idempo.stores.postgres import PostgresStore, SyncPostgresStore

url, table, children = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = SyncPostgresStore(url, table=table, max_size=2)
async_store = PostgresStore(url, table=table, max_size=2)
store.claim("parent", "fp", lease=30, ttl=60)  # both pools are open before the fork
asyncio.run(async_store.claim("parent-async", "fp", lease=30, ttl=60))


def work(name):
    for n in range(20):
        key = f"{name}-{n}"
        token = store.claim(key, "fp", lease=30, ttl=60).token
        assert store.complete(key, token, key.encode(), ttl=60)
        assert store.get(key).payload == key.encode()


async def work_async(name):
    for n in range(20):
        key = f"{name}-async-{n}"
        token = (await async_store.claim(key, "fp", lease=30, ttl=60)).token
        assert await async_store.complete(key, token, key.encode(), ttl=60)


pids = []
for index in range(children):
    pid = os.fork()
    if pid == 0:
        try:
            work(f"child{index}")
            asyncio.run(work_async(f"child{index}"))
        except BaseException as exc:
            print(f"child {index}: {exc!r}", flush=True)
            os._exit(1)
        os._exit(0)
    pids.append(pid)
work("parent")  # meanwhile, on the parent's own connections
statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
work("parent-after")  # the children did not end the parent's sessions
print("statuses", statuses, flush=True)
store.close()
"""


def test_a_forked_child_opens_a_pool_of_its_own(postgres_url: str, table: str) -> None:
    """What ``gunicorn --preload`` does: the pools are open in the parent (its start-up check), then it forks. Each
    child opens pools of its own; the parent's sessions stay the parent's, and it goes on using them."""
    result = subprocess.run(
        [sys.executable, "-c", _FORKING, postgres_url, table, "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "statuses [0, 0, 0]", result.stdout + result.stderr
    store = SyncPostgresStore(postgres_url, table=table)
    try:
        assert len(list(store.scan("child"))) == 3 * 40
    finally:
        store.close()
