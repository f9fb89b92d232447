"""SQLiteStore and SyncSQLiteStore under the faults of a real file: another process holding the write lock, sustained
load on the WAL, a full disk; and the caller's fencing token. Every fault is real: a second process, a real tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from idempo import Acquired, IdempotencyMiddleware, SQLiteStore, State, StoreError, StoreFullError
from idempo._core.plans import run
from idempo.stores._sqlite_operations import Attempt
from idempo.stores.sqlite import SyncSQLiteStore
from tests.support.environment import skip_or_fail
from tests.support.middleware import CountingApp, client_for, problem_of
from tests.support.stores import FakeClock, record_of, token_of

# -- another process holds the write lock ------------------------------------------------------------------------

# Each operation's bound is its busy timeout; what it may take beyond it (a last attempt, a loaded machine) is the
# slack. Queued one behind the other, as they were, the last of N operations would take N x TIMEOUT = 12 s.
TIMEOUT, SLACK, N = 1.0, 2.0, 12

_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
print("released", flush=True)
"""


class _Holder:
    """A process of its own holding the write lock of a database file (``BEGIN IMMEDIATE``) until released."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line == "locked\n", self.process.communicate(timeout=10)

    def release(self) -> None:
        if self.process.poll() is None:
            out, err = self.process.communicate("go\n", timeout=30)
            assert (out, err) == ("released\n", ""), (out, err)


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[_Holder]:
    holder = _Holder(path)
    try:
        yield holder
    finally:
        if holder.process.poll() is None:
            holder.process.kill()
            holder.process.wait()


def _assert_busy(exc: BaseException | None) -> None:
    assert isinstance(exc, StoreError), exc
    assert "locked" in str(exc)
    cause = exc.__cause__
    assert isinstance(cause, sqlite3.OperationalError)
    assert cause.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "on-its-thread"])
async def test_operations_waiting_for_a_lock_each_fail_within_their_own_bound(tmp_path: Path, inline: bool) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout=TIMEOUT, inline=inline)
    held = token_of(await store.claim("held", "fp", lease=60, ttl=60))
    finished: list[str] = []

    async def timed(name: str, operation: Awaitable[Any]) -> tuple[float, Any]:
        start = time.monotonic()
        try:
            result: Any = await operation
        except StoreError as exc:
            result = exc
        finished.append(name)
        return time.monotonic() - start, result

    with _write_lock_held(path) as holder:
        writes = [timed(f"claim {i}", store.claim(f"k{i}", "fp", lease=60, ttl=60)) for i in range(N - 2)]
        writes.append(timed("complete", store.complete("held", held, b"done", ttl=60)))
        writes.append(timed("release", store.release("held", held)))
        # Submitted last: a read must not wait behind the writes that wait for the lock (WAL readers never wait).
        outcomes = await asyncio.gather(*writes, timed("get", store.get("held")))
        holder.release()

    *failed, (_, record) = outcomes
    assert finished[0] == "get"  # answered before any write gave up
    assert record is not None
    assert record.state is State.IN_PROGRESS
    for elapsed, exc in failed:
        _assert_busy(exc)
        assert elapsed < TIMEOUT + SLACK, [round(e, 2) for e, _ in failed]
    # The lock is free again: the next operations succeed, and the failed ones had done nothing.
    assert isinstance(await store.claim("k0", "fp", lease=60, ttl=60), Acquired)
    assert await store.complete("held", held, b"done", ttl=60)
    await store.close()


def test_sync_store_operations_waiting_for_a_lock_each_fail_within_their_own_bound(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SyncSQLiteStore(path, busy_timeout=TIMEOUT)
    held = token_of(store.claim("held", "fp", lease=60, ttl=60))
    started = threading.Barrier(N)

    def timed(operation: Callable[[], Any]) -> tuple[float, Any]:
        started.wait(timeout=30)
        start = time.monotonic()
        try:
            result: Any = operation()
        except StoreError as exc:
            result = exc
        return time.monotonic() - start, result

    operations: list[Callable[[], Any]] = [
        *(lambda i=i: store.claim(f"k{i}", "fp", lease=60, ttl=60) for i in range(N - 2)),
        lambda: store.complete("held", held, b"done", ttl=60),
        lambda: store.release("held", held),
    ]
    with _write_lock_held(path) as holder, ThreadPoolExecutor(N) as threads:
        outcomes = list(threads.map(timed, operations))
        record = store.get("held")  # meanwhile, a read is answered at once
        holder.release()

    assert record is not None
    assert record.state is State.IN_PROGRESS
    for elapsed, exc in outcomes:
        _assert_busy(exc)
        assert elapsed < TIMEOUT + SLACK, [round(e, 2) for e, _ in outcomes]
    assert isinstance(store.claim("k0", "fp", lease=60, ttl=60), Acquired)
    assert store.complete("held", held, b"done", ttl=60)
    store.close()


async def test_an_operation_that_gets_the_lock_before_its_deadline_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout=30)
    await store.get("warm-up")
    with _write_lock_held(path) as holder:
        claim = asyncio.ensure_future(store.claim("k", "fp", lease=60, ttl=60))
        await asyncio.sleep(0)  # it has tried once and is waiting for the lock
        assert not claim.done()
        await asyncio.to_thread(holder.release)
        assert isinstance(await claim, Acquired)
    await store.close()


async def test_an_operation_cancelled_while_it_waits_for_the_lock_never_runs(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout=30)
    await store.get("warm-up")
    with _write_lock_held(path) as holder:
        with pytest.raises(TimeoutError):  # the caller's own timeout, far shorter than busy_timeout
            await asyncio.wait_for(store.claim("k", "fp", lease=60, ttl=60), timeout=0.3)
        await asyncio.to_thread(holder.release)
    await store.purge_expired()  # on the store's thread: behind anything still queued there
    assert await store.get("k") is None
    await store.close()


# -- the WAL under sustained load --------------------------------------------------------------------------------

# What the docs promise (docs/stores.md): each store checkpoints every 1000 operations and the WAL starts again from
# its beginning, so its file holds about the last 1000 operations' pages: with responses of a few KB, about 20 MB.
# Before, it grew by about 35 KB a request: 140 MB after the 4000 requests below.
WAL_BOUND = 40 * 1024 * 1024
REQUESTS = 4000
PAYLOAD = os.urandom(3000)  # a realistic stored response


def _wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_wal_stays_bounded_under_sustained_load(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = SQLiteStore(path)  # the default settings: inline, synchronous NORMAL
    largest = 0
    for batch in range(REQUESTS // 10):  # ten requests at a time, as a server runs them

        async def request(key: str) -> None:
            token = token_of(await store.claim(key, "fp", lease=60, ttl=600))
            assert await store.complete(key, token, PAYLOAD, ttl=600)

        await asyncio.gather(*(request(f"{batch}-{i}") for i in range(10)))
        largest = max(largest, _wal_size(path))
    assert largest <= WAL_BOUND, f"{largest / 2**20:.1f} MB"
    await store.close()


@pytest.mark.parametrize("threads", [1, 4])
def test_sync_store_wal_stays_bounded_under_sustained_load(tmp_path: Path, threads: int) -> None:
    path = tmp_path / "busy.db"
    store = SyncSQLiteStore(path)
    sizes: list[int] = []

    def requests(worker: int) -> None:
        for i in range(REQUESTS // threads):
            token = token_of(store.claim(f"{worker}-{i}", "fp", lease=60, ttl=600))
            assert store.complete(f"{worker}-{i}", token, PAYLOAD, ttl=600)
            if i % 10 == 0:
                sizes.append(_wal_size(path))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(requests, range(threads)))
    assert max(sizes) <= WAL_BOUND, f"{max(sizes) / 2**20:.1f} MB"
    store.close()


@pytest.mark.parametrize("inline", [True, False])
async def test_only_operations_that_write_count_towards_a_checkpoint(tmp_path: Path, inline: bool) -> None:
    # A replay only reads: the WAL does not grow, and a store that mostly replays must not checkpoint every 1000 of
    # them (on the loop's connection, and on the store's thread with inline=False).
    store = SQLiteStore(tmp_path / "replays.db", inline=inline)
    token = token_of(await store.claim("k", "fp", lease=60, ttl=600))
    assert await store.complete("k", token, b"out", ttl=600)
    checkpoints = store._thread.checkpoints
    counted = checkpoints.count
    assert counted >= 2  # the claim that inserted, the complete that updated
    for _ in range(1500):  # more than CHECKPOINT_EVERY
        assert record_of(await store.claim("k", "fp", lease=60, ttl=600)).payload == b"out"
    assert not await store.complete("k", token, b"again", ttl=600)  # an update that changes nothing
    assert checkpoints.count == counted
    assert await store.delete("k")
    assert checkpoints.count == counted + 1
    await store.close()


def test_only_operations_that_write_count_towards_a_checkpoint_on_the_sync_store(tmp_path: Path) -> None:
    store = SyncSQLiteStore(tmp_path / "replays.db")
    token = token_of(store.claim("k", "fp", lease=60, ttl=600))
    assert store.complete("k", token, b"out", ttl=600)
    checkpoints = store._pool_of_this_process().checkpoints
    counted = checkpoints.count
    assert counted == 2
    for _ in range(1500):
        assert record_of(store.claim("k", "fp", lease=60, ttl=600)).payload == b"out"
    assert checkpoints.count == counted
    assert store.delete("k")
    assert checkpoints.count == counted + 1
    store.close()


async def test_wal_file_is_cut_back_after_a_reader_held_it_open(tmp_path: Path) -> None:
    path = tmp_path / "burst.db"
    store = SQLiteStore(path)
    await store.get("warm-up")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM idempo_records").fetchone()  # a snapshot no checkpoint may go past

    async def load(prefix: str, requests: int) -> None:
        for i in range(requests):
            token = token_of(await store.claim(f"{prefix}{i}", "fp", lease=60, ttl=600))
            assert await store.complete(f"{prefix}{i}", token, PAYLOAD, ttl=600)

    await load("a", 3500)
    grown = _wal_size(path)
    assert grown > 64 * 1024 * 1024  # the reader kept every frame in the WAL
    reader.execute("COMMIT")
    reader.close()
    await load("b", 2500)  # checkpoints now complete; the first write after one cuts the file back
    assert _wal_size(path) <= 64 * 1024 * 1024  # journal_size_limit
    await store.close()


# -- a full disk ------------------------------------------------------------------------------------------------
#
# A real tmpfs of a few MB, filled up: the fault is the kernel's ENOSPC, which SQLite reports as SQLITE_FULL. (The
# other way to make SQLITE_FULL, PRAGMA max_page_count, limits the database's pages; a full disk does not fail
# there in WAL mode, where a transaction only appends to the WAL, and the database file grows at checkpoints.)
# Mounting needs root, which CI has; elsewhere the tests skip.

MARKER = b"gone"  # the size of the middleware's "response not stored" marker


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 32 MB of the test's own."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: even if a failed test left files open


def _fill(disk: Path, leave: int) -> None:
    """Fill *disk* until *leave* bytes are free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with (disk / "filler").open("wb") as filler:
        filler.write(b"\0" * max(0, free - leave))
    stat = os.statvfs(disk)
    assert stat.f_bavail * stat.f_frsize <= leave


def _assert_full(exc: BaseException) -> None:
    cause = exc.__cause__
    assert isinstance(cause, sqlite3.OperationalError)
    assert cause.sqlite_errorcode == sqlite3.SQLITE_FULL


async def test_a_small_complete_fits_where_a_large_one_does_not(tiny_disk: Path) -> None:
    store = SQLiteStore(tiny_disk / "full.db")
    token = token_of(await store.claim("k", "fp", lease=60, ttl=60))
    _fill(tiny_disk, leave=64 * 1024)
    with pytest.raises(StoreFullError, match="full") as raised:
        await store.complete("k", token, b"x" * (1 << 20), ttl=60)
    _assert_full(raised.value)
    assert await store.complete("k", token, MARKER, ttl=60)  # the middleware's fallback
    record = record_of(await store.claim("k", "fp", lease=60, ttl=60))
    assert (record.state, record.payload) == (State.COMPLETED, MARKER)
    await store.close()


def test_sync_store_small_complete_fits_where_a_large_one_does_not(tiny_disk: Path) -> None:
    store = SyncSQLiteStore(tiny_disk / "full.db")
    token = token_of(store.claim("k", "fp", lease=60, ttl=60))
    _fill(tiny_disk, leave=64 * 1024)
    with pytest.raises(StoreFullError, match="full") as raised:
        store.complete("k", token, b"x" * (1 << 20), ttl=60)
    _assert_full(raised.value)
    assert store.complete("k", token, MARKER, ttl=60)
    record = store.get("k")
    assert record is not None
    assert (record.state, record.payload) == (State.COMPLETED, MARKER)
    store.close()


async def test_a_rewound_wal_takes_small_writes_on_a_disk_with_no_byte_free(tiny_disk: Path) -> None:
    path = tiny_disk / "full.db"
    store = SQLiteStore(path)
    for i in range(1200):  # past a checkpoint: the WAL was rewound, its file keeps its size
        token = token_of(await store.claim(f"w{i}", "fp", lease=60, ttl=60))
        assert await store.complete(f"w{i}", token, b"done", ttl=60)
    await store.purge_expired()  # on the store's thread, behind the checkpoint: it has run
    token = token_of(await store.claim("k", "fp", lease=60, ttl=60))
    wal = _wal_size(path)
    _fill(tiny_disk, leave=0)
    with pytest.raises(StoreFullError, match="full") as raised:
        await store.complete("k", token, b"x" * (wal + (1 << 20)), ttl=60)  # more than the whole WAL file
    _assert_full(raised.value)
    assert await store.complete("k", token, MARKER, ttl=60)
    record = record_of(await store.claim("k", "fp", lease=60, ttl=60))
    assert (record.state, record.payload) == (State.COMPLETED, MARKER)
    await store.close()


async def test_the_middleware_on_a_full_disk_records_the_marker_and_never_runs_twice(tiny_disk: Path) -> None:
    """Issue 12, item 6: the claim lands, the disk fills while the app runs, the 1 MiB response does not fit:
    the client still gets it, the key is completed with the few-byte marker, and retries get a 410."""
    store = SQLiteStore(tiny_disk / "full.db")
    filled = asyncio.Event()

    class FillingApp(CountingApp):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            _fill(tiny_disk, leave=64 * 1024)  # the disk fills while the operation runs
            filled.set()
            await super().__call__(scope, receive, send)

    app = FillingApp(status=201, chunks=[b"x" * (1 << 20)])
    async with client_for(IdempotencyMiddleware(app, store=store, max_response_bytes=4 << 20)) as client:
        first = await client.post("/exports", content=b"{}", headers={"Idempotency-Key": "full-1"})
        retries = [
            await client.post("/exports", content=b"{}", headers={"Idempotency-Key": "full-1"}) for _ in range(2)
        ]
    assert filled.is_set()
    assert first.status_code == 201
    assert len(first.content) == 1 << 20
    for retry in retries:
        document = problem_of(retry, 410, "response-not-stored")
        assert (document["reason"], document["original_status"]) == ("store_refused", 201)
    assert app.calls == 1
    await store.close()


# -- the caller's fencing token --------------------------------------------------------------------------------


async def test_claim_takes_the_callers_token(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    assert await store.claim("k", "fp", lease=60, ttl=60, token="drawn-by-the-caller") == Acquired(
        "drawn-by-the-caller"
    )
    record = record_of(await store.claim("k", "fp", lease=60, ttl=60, token="another"))  # not taken: unchanged
    assert record.token == "drawn-by-the-caller"
    assert await store.release("k", "drawn-by-the-caller")
    assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Acquired)
    await store.close()


def test_sync_claim_takes_the_callers_token(tmp_path: Path) -> None:
    store = SyncSQLiteStore(tmp_path / "t.db")
    assert store.claim("k", "fp", lease=60, ttl=60, token="drawn-by-the-caller") == Acquired("drawn-by-the-caller")
    assert not store.complete("k", "another", b"x", ttl=60)
    assert store.complete("k", "drawn-by-the-caller", b"done", ttl=60)
    store.close()


# -- a new key's claim: one statement, and the race it must lose ---------------------------------------------------


class _ClaimedMeanwhile:
    """A connection on which another process claims the key between the claim's read and its insert."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.statements: list[str] = []

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self.statements.append(sql.split(maxsplit=1)[0])
        if sql.startswith("INSERT INTO") and "ON CONFLICT DO NOTHING" in sql:
            other = SyncSQLiteStore(self.path)
            assert other.claim("k", "first", lease=60, ttl=60, token="theirs") == Acquired("theirs")
            other.close()
        return self.conn.execute(sql, *args)


def test_a_new_keys_claim_that_loses_the_race_finds_the_winners_record(tmp_path: Path) -> None:
    """The read found no record; another process claimed the key before the insert: the insert does nothing, and
    the claim answers the winner's record (taken under the write lock), never a second owner."""
    store = SQLiteStore(tmp_path / "r.db")
    conn = store._database.connect()
    racing = _ClaimedMeanwhile(conn, tmp_path / "r.db")
    claim = store._claim(cast(sqlite3.Connection, racing), "k", "second", 60, 60, "ours")
    record = record_of(claim)
    assert (record.fingerprint, record.token, record.state) == ("first", "theirs", State.IN_PROGRESS)
    assert racing.statements == ["SELECT", "INSERT", "BEGIN", "SELECT", "COMMIT"]
    assert not conn.in_transaction
    conn.close()


def test_a_new_keys_claim_is_a_read_and_one_insert(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "n.db")
    conn = store._database.connect()
    counting = _Counting(conn)
    assert store._claim(cast(sqlite3.Connection, counting), "k", "fp", 60, 60, "ours") == Acquired("ours")
    assert counting.statements == ["SELECT", "INSERT"]
    record = record_of(store._claim(cast(sqlite3.Connection, counting), "k", "fp", 60, 60, "again"))
    assert record.token == "ours"
    conn.close()


class _Counting:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[str] = []

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self.statements.append(sql.split(maxsplit=1)[0])
        return self.conn.execute(sql, *args)


# -- purge_expired: in batches, without an index on expires_at ---------------------------------------------------


def _expire_every_other(store: SyncSQLiteStore, clock: FakeClock, count: int) -> set[str]:
    """*count* records, every other one of them expired by now; the live keys."""
    live = set()
    for i in range(count):
        key = f"k{i:05d}"
        token = token_of(store.claim(key, "fp", lease=60, ttl=10 if i % 2 else 1000))
        assert store.complete(key, token, b"out", ttl=10 if i % 2 else 1000)
        if not i % 2:
            live.add(key)
    clock.now += 100
    return live


def test_a_purge_walks_the_table_in_batches_and_deletes_exactly_the_expired_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SyncSQLiteStore(tmp_path / "purge.db", clock=clock)
    live = _expire_every_other(store, clock, 2500)
    batches: list[tuple[int, str | None]] = []

    def perform(effect: Any) -> Any:  # the store's own, counting the batches (each a write transaction of its own)
        result = store._perform(effect)
        if isinstance(effect, Attempt):
            batches.append(result)
        return result

    assert run(store._purge_plan(), perform) == 1250
    assert [count for count, _ in batches] == [500, 500, 250, 0]  # 1000 keys per batch, then the table's end
    assert [end for _, end in batches] == ["k00999", "k01999", "k02499", None]
    with sqlite3.connect(tmp_path / "purge.db") as conn:
        assert {key for (key,) in conn.execute("SELECT key FROM idempo_records")} == live
    assert store.purge_expired() == 0
    store.close()


async def test_the_async_store_purges_in_batches_too(tmp_path: Path) -> None:
    clock = FakeClock()
    sync = SyncSQLiteStore(tmp_path / "purge.db", clock=clock)
    live = _expire_every_other(sync, clock, 2100)
    sync.close()
    store = SQLiteStore(tmp_path / "purge.db", clock=clock)
    assert await store.purge_expired() == 1050
    assert await store.purge_expired() == 0
    for key in ("k00000", "k01000", "k02098"):
        assert key in live
        assert (await store.get(key)) is not None
    assert await store.get("k00001") is None
    await store.close()


def test_the_index_on_expires_at_an_earlier_version_made_is_dropped(tmp_path: Path) -> None:
    # An earlier version kept an index on expires_at, which every new key paid for; opening the file drops it.
    path = tmp_path / "old.db"
    store = SyncSQLiteStore(path)
    assert store.purge_expired() == 0  # makes the table
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE INDEX idempo_records_expires_at ON idempo_records (expires_at)")
    store = SyncSQLiteStore(path)
    assert isinstance(store.claim("k", "fp", lease=60, ttl=60), Acquired)
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall() == []
