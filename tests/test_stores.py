"""The built-in stores: the conformance suite against each, and what only MemoryStore and SQLiteStore promise."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, cast

import pytest

import idempo
from idempo import (
    Acquired,
    Claim,
    ConfigurationError,
    Existing,
    MemoryStore,
    Record,
    SQLiteStore,
    State,
    Store,
    StoreError,
    store_from_url,
)
from idempo.stores import ScanningStore, SyncScanningStore, SyncStore, redact, sync_store_from_url
from idempo.stores._scan import glob_prefix, like_prefix, prefix_end
from idempo.stores.memory import SyncMemoryStore
from idempo.stores.sqlite import SyncSQLiteStore
from idempo.testing import StoreConformance, SyncStoreConformance
from tests.support.middleware import DelegatingStore
from tests.support.stores import FakeClock, record_of, token_of

# The built-in stores are local and fast: short real leases keep the suite quick. Every check that a claim is
# *still* held uses the suite's long lease, so a loaded machine cannot make these flaky.
_FAST = {"short_lease": 0.03, "short_ttl": 0.03, "expiry_margin": 0.03}


class TestMemoryStoreConformance(StoreConformance):
    short_lease = _FAST["short_lease"]
    short_ttl = _FAST["short_ttl"]
    expiry_margin = _FAST["expiry_margin"]

    async def open_store(self) -> Store:
        return MemoryStore()


class TestSQLiteStoreConformance(StoreConformance):
    short_lease = _FAST["short_lease"]
    short_ttl = _FAST["short_ttl"]
    expiry_margin = _FAST["expiry_margin"]
    path: Path

    @pytest.fixture(autouse=True)
    def _database_in_tmp_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "conformance.db"

    async def open_store(self) -> Store:
        return SQLiteStore(self.path)


class TestSQLiteStoreOnItsThreadConformance(TestSQLiteStoreConformance):
    """``inline=False``: every statement runs on the store's thread."""

    async def open_store(self) -> Store:
        return SQLiteStore(self.path, inline=False)


class TestSQLiteStoreInMemoryConformance(TestSQLiteStoreConformance):
    """``":memory:"``: one connection, one private database."""

    async def open_store(self) -> Store:
        return SQLiteStore(":memory:")


# -- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, FakeClock]]:
    """Each built-in store that takes a clock (Redis keeps the server's), on a fake clock."""
    clock = FakeClock()
    if request.param == "postgres":
        from idempo.stores.postgres import PostgresStore

        store: Store = PostgresStore(
            request.getfixturevalue("postgres_url"), table=request.getfixturevalue("table"), clock=clock
        )
    elif request.param == "memory":
        store = MemoryStore(clock=clock)
    else:
        store = SQLiteStore(tmp_path / "c.db", clock=clock)
    yield store, clock
    await store.close()


# -- the stores that take a clock, on a fake one -----------------------------------------------------------------------


def test_built_in_stores_are_stores(tmp_path: Path) -> None:
    assert isinstance(MemoryStore(), idempo.Store)
    assert isinstance(SQLiteStore(tmp_path / "x.db"), idempo.Store)
    assert not isinstance(object(), idempo.Store)


async def test_record_times_follow_the_clock(clocked: tuple[Store, FakeClock]) -> None:
    store, clock = clocked
    start = clock.now
    token = token_of(await store.claim("k", "fp", lease=10, ttl=100))
    assert await store.get("k") == Record("k", State.IN_PROGRESS, "fp", token, start, start + 10, start + 100)
    clock.now = start + 5
    assert await store.renew("k", token, lease=10)
    assert await store.get("k") == Record("k", State.IN_PROGRESS, "fp", token, start, start + 15, start + 100)
    clock.now = start + 6
    assert await store.complete("k", token, b"out", ttl=50)
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.token, record.created_at, record.expires_at, record.payload) == (
        State.COMPLETED,
        "",
        start,
        start + 56,
        b"out",
    )


async def test_lease_ends_exactly_at_lease_expires_at(clocked: tuple[Store, FakeClock]) -> None:
    store, clock = clocked
    start = clock.now
    token = token_of(await store.claim("k", "fp", lease=10, ttl=100))
    clock.now = start + 9.999
    assert record_of(await store.claim("k", "fp", lease=10, ttl=100)).token == token
    clock.now = start + 10
    assert token_of(await store.claim("k", "other", lease=10, ttl=100)) != token
    assert not await store.complete("k", token, b"stale", ttl=100)


@pytest.mark.parametrize("get_first", [True, False], ids=["get-first", "claim-alone"])
async def test_record_expires_exactly_at_expires_at(clocked: tuple[Store, FakeClock], get_first: bool) -> None:
    # Without a get() first (which drops the expired record), the claim alone must see the expiry: on the memory
    # store's replay read without the lock as on every store.
    store, clock = clocked
    start = clock.now
    token = token_of(await store.claim("k", "fp", lease=10, ttl=100))
    assert await store.complete("k", token, b"out", ttl=50)
    clock.now = start + 49.999
    assert record_of(await store.claim("k", "fp", lease=10, ttl=100)).payload == b"out"
    clock.now = start + 50
    if get_first:
        assert await store.get("k") is None
    assert isinstance(await store.claim("k", "other", lease=10, ttl=100), Acquired)
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.fingerprint, record.payload) == (State.IN_PROGRESS, "other", None)


async def test_stale_record_is_still_returned_by_get(clocked: tuple[Store, FakeClock]) -> None:
    store, clock = clocked
    token = token_of(await store.claim("k", "fp", lease=10, ttl=100))
    clock.now += 50
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.token) == (State.IN_PROGRESS, token)


async def test_purge_expired_counts_exactly_what_it_removes(clocked: tuple[Store, FakeClock]) -> None:
    store, clock = clocked
    assert await store.purge_expired() == 0
    for key in ("a", "b", "c"):
        await store.claim(key, "fp", lease=10, ttl=20)
    assert await store.complete("d", token_of(await store.claim("d", "fp", lease=10, ttl=1000)), b"", ttl=5)
    assert await store.complete("live", token_of(await store.claim("live", "fp", lease=10, ttl=20)), b"kept", ttl=1000)
    clock.now += 20
    assert await store.purge_expired() == 4  # a, b, c in progress and d completed, all past their TTL
    assert await store.purge_expired() == 0
    record = await store.get("live")
    assert record is not None
    assert record.payload == b"kept"


async def test_sqlite_purge_deletes_the_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SQLiteStore(tmp_path / "purge.db", clock=clock)
    for key in ("a", "b"):
        await store.claim(key, "fp", lease=10, ttl=20)
    await store.claim("live", "fp", lease=10, ttl=1000)
    clock.now += 20
    assert await store.purge_expired() == 2
    await store.close()
    with sqlite3.connect(tmp_path / "purge.db") as conn:
        assert conn.execute("SELECT key FROM idempo_records").fetchall() == [("live",)]
    conn.close()


# The memory store's own promises (its bounds, its refusals, the check for other workers): test_store_memory.py.


# -- SQLiteStore: several processes, several objects, fork -----------------------------------------------------


_RACER = """
import asyncio, json, sys
from idempo import Acquired, SQLiteStore

async def race(path, keys):
    store = SQLiteStore(path)
    await store.get("warm-up")  # connect (and open the loop's own connection) before the start
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal
    claims = await asyncio.gather(*(store.claim(key, "fp", lease=60, ttl=60) for key in keys))
    print(json.dumps([claim.token if isinstance(claim, Acquired) else None for claim in claims]), flush=True)
    await store.close()

asyncio.run(race(sys.argv[1], sys.argv[2:]))
"""


def test_processes_racing_on_one_file_have_one_winner_per_key(tmp_path: Path) -> None:
    path, racers, keys = tmp_path / "race.db", 6, [f"race-{i}" for i in range(20)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(path), *keys],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(racers)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n", process.communicate(timeout=10)
        for process in processes:  # every racer is connected and waiting: start them all at once
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [(process.returncode, err) for process, (_, err) in zip(processes, outputs, strict=True)] == [
        (0, "")
    ] * racers
    tokens: list[list[str | None]] = [json.loads(out) for out, _ in outputs]
    winners = {key: [claims[i] for claims in tokens if claims[i] is not None] for i, key in enumerate(keys)}
    assert {key: len(won) for key, won in winners.items()} == dict.fromkeys(keys, 1)

    async def check() -> None:
        store = SQLiteStore(path)
        for key, (token,) in winners.items():
            record = await store.get(key)
            assert record is not None
            assert record.token == token
        await store.close()

    asyncio.run(check())


async def test_two_stores_on_one_file_see_each_others_records(tmp_path: Path) -> None:
    first, second = SQLiteStore(tmp_path / "shared.db"), SQLiteStore(tmp_path / "shared.db")
    token = token_of(await first.claim("k", "fp", lease=60, ttl=60))
    assert record_of(await second.claim("k", "fp", lease=60, ttl=60)).token == token
    assert await second.complete("k", token, b"done", ttl=60)  # the token is the owner's, whichever object holds it
    assert record_of(await first.claim("k", "fp", lease=60, ttl=60)).payload == b"done"
    assert await first.delete("k")
    assert await second.get("k") is None
    await first.close()
    await second.close()


async def test_writer_waits_for_another_connections_lock(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path)
    await store.get("warm-up")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.2, holder.execute, "ROLLBACK")
    start = time.monotonic()
    assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Acquired)
    assert time.monotonic() - start >= 0.15  # it waited for the lock instead of failing
    holder.close()
    await store.close()


async def test_busy_timeout_option_bounds_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = store_from_url(f"sqlite:///{path}?busy_timeout=0.2")
    await store.get("warm-up")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    start = time.monotonic()
    try:
        with pytest.raises(StoreError, match="locked") as raised:
            await store.claim("k", "fp", lease=60, ttl=60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 0.15 <= time.monotonic() - start < 3  # about busy_timeout, far below the 5 s default
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Acquired)  # and it recovers
    await store.close()


async def test_sqlite_error_surfaces_as_store_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a SQLite database. " * 200)
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="not a database") as raised:
        await store.claim("k", "fp", lease=60, ttl=60)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    await store.close()


def _use_inherited_store(store: SQLiteStore, parent_key: str, child_key: str, results: Queue[Any]) -> None:
    """In a forked child: use the store the parent had already used."""

    async def child() -> tuple[bytes | None, bool]:
        record = await store.get(parent_key)
        token = token_of(await store.claim(child_key, "child", lease=60, ttl=60))
        completed = await store.complete(child_key, token, b"from the child", ttl=60)
        await store.close()
        return (None if record is None else record.payload), completed

    try:
        results.put(("ok", asyncio.run(child())))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def test_store_used_before_fork_works_in_the_child(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "fork.db")

    async def parent_before() -> None:
        token = token_of(await store.claim("parent", "fp", lease=60, ttl=60))
        assert await store.complete("parent", token, b"from the parent", ttl=60)
        assert await store.get("parent") is not None  # the store's thread and both connections are open

    asyncio.run(parent_before())
    ctx = multiprocessing.get_context("fork")
    results: Queue[Any] = ctx.Queue()
    child = ctx.Process(target=_use_inherited_store, args=(store, "parent", "child", results))
    child.start()
    try:
        outcome = results.get(timeout=30)  # a child that used the parent's thread would hang here
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert outcome == ("ok", (b"from the parent", True))
    assert child.exitcode == 0

    async def parent_after() -> None:
        record = await store.get("child")  # the parent's own connections still work
        assert record is not None
        assert record.payload == b"from the child"
        assert isinstance(await store.claim("after", "fp", lease=60, ttl=60), Acquired)
        await store.close()

    asyncio.run(parent_after())


def test_one_store_serves_several_threads_each_with_its_own_loop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "threads.db")
    asyncio.run(store.get("warm-up"))  # open the loop's connection, which the threads then contend for
    threads, rounds = 4, 150
    start, errors = threading.Barrier(threads), list[str]()

    def worker(n: int) -> None:
        async def run() -> None:
            for i in range(rounds):
                token = token_of(await store.claim(f"{n}-{i}", "fp", lease=60, ttl=60))
                assert await store.complete(f"{n}-{i}", token, b"done", ttl=60)

        try:
            start.wait(timeout=30)
            asyncio.run(run())
        except BaseException as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert errors == []

    async def check() -> None:
        for n in range(threads):
            for i in range(rounds):
                record = await store.get(f"{n}-{i}")
                assert record is not None
                assert record.payload == b"done"
        await store.close()

    asyncio.run(check())


class _CommitFails:
    """A connection whose COMMIT fails, as a busy one does on a database that is not in WAL mode."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database is locked")
        return self.conn.execute(sql, *args)


def test_failed_commit_never_leaves_the_write_lock_held(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    conn = store._database.connect()
    store._claim(conn, "k", "fp", -1, 60)  # a claim whose lease ran out: the next one takes it over, in a transaction
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store._claim(cast(sqlite3.Connection, _CommitFails(conn)), "k", "fp", 60, 60)
    assert not conn.in_transaction
    other = sqlite3.connect(tmp_path / "c.db", timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock is free
    other.execute("ROLLBACK")
    other.close()
    conn.close()


async def test_claim_is_not_reported_failed_when_the_loop_connection_cannot_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "c.db")

    def cannot_open() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store._database, "connect_inline", cannot_open)
    token = token_of(await store.claim("k", "fp", lease=60, ttl=60))  # it took effect: it must say so
    assert "stays on its thread" in caplog.text
    assert record_of(await store.claim("k", "fp", lease=60, ttl=60)).token == token
    assert await store.complete("k", token, b"done", ttl=60)
    await store.close()


async def test_closed_sqlite_store_can_be_closed_again(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    await store.claim("k", "fp", lease=60, ttl=60)
    await store.close()
    await store.close()


# -- store_from_url --------------------------------------------------------------------------------------------


async def test_memory_url() -> None:
    store = store_from_url("memory://")
    assert isinstance(store, MemoryStore)
    assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Acquired)
    await store.close()


async def test_relative_sqlite_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    store = store_from_url("sqlite:///data/idem.db")
    assert isinstance(store, SQLiteStore)
    monkeypatch.chdir(tmp_path / "elsewhere")  # the store opens its file lazily: the path was pinned at open
    await store.claim("k", "fp", lease=60, ttl=60)
    await store.close()
    assert (tmp_path / "data" / "idem.db").is_file()
    assert list((tmp_path / "elsewhere").iterdir()) == []


async def test_absolute_sqlite_url(tmp_path: Path) -> None:
    path = tmp_path / "abs.db"
    assert str(path).startswith("/")
    store = store_from_url(f"sqlite:///{path}")  # sqlite:////tmp/...
    await store.claim("k", "fp", lease=60, ttl=60)
    await store.close()
    assert path.is_file()


async def test_sqlite_url_table_option(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = store_from_url(f"sqlite:///{path}?table=my_records")
    await store.claim("k", "fp", lease=60, ttl=60)
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT key FROM my_records").fetchall() == [("k",)]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"my_records"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://?max_entries=many", "not a whole number"),
        ("memory://?max_entries=0", "at least 1"),
        ("sqlite:///x.db?busy_timeout=soon", "not a number"),
        ("sqlite:///x.db?busy_timeout=-1", "negative"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous"),
        ("sqlite:///x.db?table=drop%20table", "table name"),
        ("sqlite:///x.db?table=1abc", "table name"),
        ("sqlite:///x.db?table=a-b", "table name"),
        ("sqlite:///x.db?table=" + "t" * 64, "table name"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite://", "needs a file"),
        ("sqlite:///", "needs a file"),
        ("idempo.db", "not a store URL"),
        ("/var/lib/idempo.db", "not a store URL"),
    ],
)
def test_invalid_urls_are_configuration_errors(
    url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=message):
        store_from_url(url)


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="unknown store scheme 'dynamodb'") as raised:
        store_from_url("dynamodb://table")
    assert "known schemes: memory, sqlite" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:secret@localhost:3306/app",
        "mongodb://:secret@localhost",
        "amqp://user:se@cret@localhost/vhost",  # a raw "@" in the password
        "couchdb://app:secret@db.internal/idempo?secret=no",
    ],
)
def test_unknown_scheme_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown store scheme") as raised:
        store_from_url(url)
    message = str(raised.value)
    assert "secret@" not in message
    assert "cret@" not in message
    assert ":***@" in message


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://user:secret@host", "redis://user:***@host"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p@ss@host/0?x=@", "rediss://user:***@host/0?x=@"),
        ("redis+cluster://u:pw@h1:1,h2:2", "redis+cluster://u:***@h1:1,h2:2"),
        ("postgresql://app:s3cr%40t@db/idempo", "postgresql://app:***@db/idempo"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host", "redis://user@host"),
        ("sqlite:///a:b@c.db", "sqlite:///a:b@c.db"),
    ],
)
def test_redact(url: str, redacted: str) -> None:
    assert redact(url) == redacted


def test_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        store_from_url(f"sqlite:///{tmp_path}/no/such/dir/idem.db")


def test_a_url_that_cannot_be_parsed_is_a_configuration_error() -> None:
    """A broken URL (here an unclosed IPv6 bracket) is reported as such, with its password hidden."""
    with pytest.raises(ConfigurationError, match="not a valid store URL") as caught:
        store_from_url("redis://user:secret@[::1/0")
    assert "secret" not in str(caught.value)


class TestSyncMemoryStore(SyncStoreConformance):
    """The blocking twin of the memory store, raced from real threads."""

    short_lease = 0.03
    short_ttl = 0.03

    def open_sync_store(self) -> SyncStore:
        return MemoryStore().sync()


def test_a_memory_store_and_its_sync_twin_share_their_records() -> None:
    """What the middleware recorded, a sync caller sees, and the other way round."""
    store = MemoryStore()
    claim = store.sync().claim("k", "fp", lease=30, ttl=60)
    assert isinstance(claim, Acquired)
    assert asyncio.run(store.get("k")) is not None
    assert isinstance(sync_store_from_url("memory://"), SyncMemoryStore)


# -- SyncSQLiteStore: the blocking twin of SQLiteStore ---------------------------------------------------------


class TestSyncSQLiteStore(SyncStoreConformance):
    """The blocking SQLite store, raced from real threads, each on a connection of its own."""

    short_lease = _FAST["short_lease"]
    short_ttl = _FAST["short_ttl"]
    expiry_margin = _FAST["expiry_margin"]
    path: Path

    @pytest.fixture(autouse=True)
    def _database_in_tmp_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "sync-conformance.db"

    def open_sync_store(self) -> SyncStore:
        return SyncSQLiteStore(self.path)


class TestSyncSQLiteStoreInMemory(TestSyncSQLiteStore):
    """``":memory:"``: one connection, which the threads take turns on."""

    def open_sync_store(self) -> SyncStore:
        return SyncSQLiteStore(":memory:")


async def test_a_sqlite_store_and_its_sync_twin_share_their_records(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "twins.db", table="twins", busy_timeout=2, synchronous="FULL")
    twin = store.sync()
    assert isinstance(twin, SyncSQLiteStore)
    assert store.sync() is twin
    assert (twin._path, twin._table, twin._busy_timeout, twin._synchronous) == (
        str(tmp_path / "twins.db"), "twins", 2, "FULL",
    )  # fmt: skip
    token = token_of(await store.claim("from-async", "fp", lease=60, ttl=60))
    assert record_of(twin.claim("from-async", "fp", lease=60, ttl=60)).token == token
    assert twin.complete("from-async", token, b"done", ttl=60)  # the owner's token works through either
    assert record_of(await store.claim("from-async", "fp", lease=60, ttl=60)).payload == b"done"
    sync_token = token_of(twin.claim("from-sync", "fp", lease=60, ttl=60))
    assert record_of(await store.claim("from-sync", "fp", lease=60, ttl=60)).token == sync_token
    assert await store.release("from-sync", sync_token)
    assert twin.get("from-sync") is None
    # Another sync store on the same file (not the twin) sees the same records.
    other = sync_store_from_url(f"sqlite:///{tmp_path}/twins.db?table=twins")
    assert record_of(other.claim("from-async", "fp", lease=60, ttl=60)).payload == b"done"
    other.close()
    await store.close()  # closes the twin's connections too
    assert twin._pool.opened == 0


def test_threads_claiming_one_key_have_one_winner(tmp_path: Path) -> None:
    store = SyncSQLiteStore(tmp_path / "race.db")
    threads, keys = 16, 20
    start = threading.Barrier(threads)
    claims: list[list[Claim]] = [[] for _ in range(keys)]
    errors: list[str] = []

    def worker() -> None:
        try:
            start.wait(timeout=30)
            for k in range(keys):
                claims[k].append(store.claim(f"key-{k}", "fp", lease=60, ttl=60))
        except BaseException as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert errors == []
    for results in claims:
        assert len(results) == threads
        winners = [c for c in results if isinstance(c, Acquired)]
        assert len(winners) == 1
        assert all(record_of(c).token == winners[0].token for c in results if isinstance(c, Existing))
    assert store._pool.opened <= threads  # a connection per concurrent caller, never more
    store.close()
    assert store._pool.opened == 0


def test_sync_sqlite_store_threads_never_share_a_connection(tmp_path: Path) -> None:
    store = SyncSQLiteStore(tmp_path / "threads.db")
    threads, rounds = 8, 100
    start, errors = threading.Barrier(threads), list[str]()

    def worker(n: int) -> None:
        try:
            start.wait(timeout=30)
            for i in range(rounds):
                token = token_of(store.claim(f"{n}-{i}", "fp", lease=60, ttl=60))
                assert store.complete(f"{n}-{i}", token, b"done", ttl=60)
        except BaseException as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert errors == []
    assert all(store.get(f"{n}-{i}") is not None for n in range(threads) for i in range(rounds))
    store.close()


def test_sync_sqlite_url(tmp_path: Path) -> None:
    store = sync_store_from_url(f"sqlite:///{tmp_path}/u.db?table=idem&busy_timeout=0.5&synchronous=full&inline=0")
    assert isinstance(store, SyncSQLiteStore)
    assert (store._path, store._table, store._busy_timeout, store._synchronous) == (
        str(tmp_path / "u.db"), "idem", 0.5, "FULL",
    )  # fmt: skip
    assert repr(store) == f"SyncSQLiteStore({str(tmp_path / 'u.db')!r}, table='idem')"
    assert isinstance(store.claim("k", "fp", lease=60, ttl=60), Acquired)
    store.close()
    with pytest.raises(ConfigurationError, match="no host"):
        sync_store_from_url("sqlite://host/x.db")
    with pytest.raises(ConfigurationError, match="table name"):
        sync_store_from_url(f"sqlite:///{tmp_path}/u.db?table=no-dashes")


def test_sync_sqlite_busy_timeout_bounds_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SyncSQLiteStore(path, busy_timeout=0.2)
    store.get("warm-up")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    start = time.monotonic()
    try:
        with pytest.raises(StoreError, match="locked") as raised:
            store.claim("k", "fp", lease=60, ttl=60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 0.15 <= time.monotonic() - start < 3
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert isinstance(store.claim("k", "fp", lease=60, ttl=60), Acquired)  # and it recovers
    store.close()


def test_sync_sqlite_error_surfaces_as_store_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a SQLite database. " * 200)
    store = SyncSQLiteStore(path)
    with pytest.raises(StoreError, match="not a database") as raised:
        store.claim("k", "fp", lease=60, ttl=60)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    assert store._pool.opened == 0  # the connection that failed to open was not counted, nor left open
    store.close()


def test_sync_sqlite_store_closes_a_connection_in_use_when_its_operation_ends(tmp_path: Path) -> None:
    store = SyncSQLiteStore(tmp_path / "c.db")
    store.get("warm-up")
    inside, go_on = threading.Event(), threading.Event()
    seen: list[Record | None] = []

    def slow_get(conn: sqlite3.Connection, key: str) -> Record | None:
        inside.set()
        go_on.wait(timeout=30)
        return store._get(conn, key)

    thread = threading.Thread(target=lambda: seen.append(store._run(slow_get, ("k",))))
    thread.start()
    assert inside.wait(timeout=30)
    pool = store._pool
    store.close()
    store.close()  # twice is fine
    go_on.set()
    thread.join(timeout=30)
    assert seen == [None]
    assert pool.opened == 0
    assert pool.idle == []
    assert isinstance(store.claim("k", "fp", lease=60, ttl=60), Acquired)  # a closed store opens anew
    store.close()


def _use_inherited_sync_store(store: SyncSQLiteStore, parent_key: str, results: Queue[Any]) -> None:
    try:
        record = store.get(parent_key)
        token = token_of(store.claim("child", "child", lease=60, ttl=60))
        completed = store.complete("child", token, b"from the child", ttl=60)
        store.close()
        results.put(("ok", (None if record is None else record.payload), completed))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def test_sync_sqlite_store_used_before_fork_works_in_the_child(tmp_path: Path) -> None:
    store = SyncSQLiteStore(tmp_path / "fork.db")
    token = token_of(store.claim("parent", "fp", lease=60, ttl=60))
    assert store.complete("parent", token, b"from the parent", ttl=60)
    ctx = multiprocessing.get_context("fork")
    results: Queue[Any] = ctx.Queue()
    child = ctx.Process(target=_use_inherited_sync_store, args=(store, "parent", results))
    child.start()
    try:
        outcome = results.get(timeout=30)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert outcome == ("ok", b"from the parent", True)
    assert child.exitcode == 0
    record = store.get("child")  # the parent's own connections still work
    assert record is not None
    assert record.payload == b"from the child"
    store.close()


# -- scan: the optional capability of listing records ----------------------------------------------------------


class _NoScan(DelegatingStore):
    """A user's own store, complete but without ``scan``: it stays a Store."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())


def test_built_in_stores_can_scan_and_a_store_without_scan_is_still_a_store() -> None:
    for cls in (MemoryStore, SQLiteStore):
        assert issubclass(cls, ScanningStore), cls
    for sync_cls in (SyncMemoryStore, SyncSQLiteStore):
        assert issubclass(sync_cls, SyncScanningStore), sync_cls
    assert isinstance(_NoScan(), Store)
    assert not isinstance(_NoScan(), ScanningStore)


def test_the_scan_scenarios_skip_a_store_without_scan() -> None:
    class Suite(StoreConformance):
        async def open_store(self) -> Store:
            return _NoScan()

    with pytest.raises(pytest.skip.Exception, match="has no scan"):
        Suite().test_scan_limit()
    Suite().test_delete_removes_record()  # the rest of the suite still runs


async def _scanned(store: Store, prefix: str = "", limit: int | None = None) -> list[str]:
    assert isinstance(store, ScanningStore)
    return [record.key async for record in store.scan(prefix, limit=limit)]


# Keys in code point order (sorted() order), some beyond ASCII, one with U+10FFFF (the last code point).
_ORDERED_KEYS = ["a", "a:", "a:1", "a:10", "a:2", "a\x7f", "aé", "a\U0001f600", "a\U0010ffff", "a\U0010ffffz", "b"]


@pytest.mark.parametrize("page_size", [1, 2, 500])
async def test_sqlite_scan_pages_through_the_key_order(tmp_path: Path, page_size: int) -> None:
    store = SQLiteStore(tmp_path / "scan.db")
    store._scan_page_size = page_size
    for key in reversed(_ORDERED_KEYS):
        await store.claim(key, "fp", lease=60, ttl=600)
    assert await _scanned(store) == sorted(_ORDERED_KEYS)
    assert await _scanned(store, "a:") == ["a:", "a:1", "a:10", "a:2"]
    assert await _scanned(store, "a\U0010ffff") == ["a\U0010ffff", "a\U0010ffffz"]
    assert await _scanned(store, "a", limit=3) == ["a", "a:", "a:1"]
    assert await _scanned(store, "a", limit=0) == []
    twin = store.sync()
    twin._scan_page_size = page_size
    assert [record.key for record in twin.scan("a:", limit=3)] == ["a:", "a:1", "a:10"]
    await store.close()


async def test_memory_scan_is_in_key_order() -> None:
    store = MemoryStore()
    for key in reversed(_ORDERED_KEYS):
        await store.claim(key, "fp", lease=60, ttl=600)
    assert await _scanned(store) == sorted(_ORDERED_KEYS)
    assert await _scanned(store, "a", limit=4) == ["a", "a:", "a:1", "a:10"]
    assert [record.key for record in store.sync().scan("a\U0010ffff")] == ["a\U0010ffff", "a\U0010ffffz"]


async def test_scan_follows_the_clock(clocked: tuple[Store, FakeClock]) -> None:
    """On a fake clock: a record is listed until the moment it expires, and a stale claim is still listed."""
    store, clock = clocked
    start = clock.now
    await store.claim("k:short", "fp", lease=5, ttl=10)
    token = token_of(await store.claim("k:done", "fp", lease=5, ttl=100))
    assert await store.complete("k:done", token, b"r", ttl=20)
    clock.now = start + 9.999
    assert await _scanned(store, "k:") == ["k:done", "k:short"]
    clock.now = start + 10
    assert await _scanned(store, "k:") == ["k:done"]
    clock.now = start + 20
    assert await _scanned(store, "k:") == []


async def test_sqlite_scan_lists_each_record_once_while_records_are_written(tmp_path: Path) -> None:
    """Pages are separate statements: records claimed between them appear at most once, and every record that
    was there throughout is listed."""
    store = SQLiteStore(tmp_path / "scan.db")
    store._scan_page_size = 2
    before = [f"k:{i:02d}" for i in range(0, 20, 2)]
    for key in before:
        await store.claim(key, "fp", lease=60, ttl=600)
    seen: list[str] = []
    async for record in store.scan("k:"):
        seen.append(record.key)
        await store.claim(record.key + "+", "fp", lease=60, ttl=600)  # right after the cursor
        await store.claim(f"k:00-{len(seen)}", "fp", lease=60, ttl=600)  # behind it
    assert len(seen) == len(set(seen))
    assert set(before) <= set(seen)
    assert seen == sorted(seen)
    assert any(key.endswith("+") for key in seen)  # records written ahead of the scan's pages are listed
    await store.close()


def test_scan_with_a_negative_limit_is_a_value_error(tmp_path: Path) -> None:
    for store in (SyncMemoryStore(), SyncSQLiteStore(tmp_path / "neg.db")):
        with pytest.raises(ValueError, match="limit"):
            list(store.scan(limit=-1))
        store.close()


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        ("", None),
        ("a", "b"),
        ("a:", "a;"),
        ("\U0010ffff", None),
        ("a\U0010ffff\U0010ffff", "b"),
        ("\ud7ff", "\ue000"),  # U+D800..U+DFFF are surrogates, which no store can hold
    ],
)
def test_prefix_end(prefix: str, end: str | None) -> None:
    assert prefix_end(prefix) == end


def test_patterns_take_the_prefix_literally() -> None:
    assert glob_prefix("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f*"
    assert like_prefix("50%_off!") == "50!%!_off!!%"
