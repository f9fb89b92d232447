"""What only the memory store promises: bounded by records and by bytes without ever dropping a live record (a full
store refuses instead), one caller's flood never costing another caller its records, the caller's own fencing token,
and its refusal to serve several workers of one server (tested with real forked processes here, and under uvicorn
in tests/e2e/test_memory_workers.py)."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from idempo import (
    Acquired,
    ConfigurationError,
    Existing,
    IdempotencyMiddleware,
    MemoryStore,
    State,
    StoreFullError,
    store_from_url,
)
from idempo.asgi import Message, Receive, Scope, Send
from idempo.stores import parse_store_url, sync_store_from_url
from idempo.stores._workers import other_workers
from idempo.stores.memory import _RECORD_BYTES, _RESULT_ROOM, MAX_BYTES, MAX_ENTRIES, SyncMemoryStore
from tests.support.middleware import client_for, problem_of
from tests.support.stores import FakeClock, record_of, token_of

KIB = 1024
MIB = 1024 * KIB
REPO = Path(__file__).resolve().parents[1]


def counted(store: MemoryStore | SyncMemoryStore) -> int:
    """What the store's records should count for, recomputed from the records themselves."""
    return sum(
        _RECORD_BYTES + len(key) + len(entry[2]) + (_RESULT_ROOM if entry[7] is None else len(entry[7]))
        for key, entry in store._records.items()
    )


async def fill(store: MemoryStore, keys: list[str], *, ttl: float = 1000, payload: bytes = b"r") -> list[str]:
    """Claim each key and, unless *payload* is empty, complete it; return the tokens."""
    tokens = []
    for key in keys:
        token = token_of(await store.claim(key, "fp", lease=10, ttl=ttl))
        if payload:
            assert await store.complete(key, token, payload, ttl=ttl)
        tokens.append(token)
    return tokens


async def live_keys(store: MemoryStore, keys: list[str]) -> list[str]:
    return [key for key in keys if await store.get(key) is not None]


# -- the bound on records ----------------------------------------------------------------------------------------


async def test_a_full_store_refuses_a_new_key_and_keeps_every_completed_record() -> None:
    store = MemoryStore(max_entries=10, clock=FakeClock())
    keys = [f"k{i}" for i in range(10)]
    await fill(store, keys)
    with pytest.raises(StoreFullError, match="memory store full: a new key does not fit beside its 10 live records"):
        await store.claim("new", "fp", lease=10, ttl=1000)
    assert await live_keys(store, keys) == keys
    assert await store.get("new") is None


async def test_a_full_store_keeps_every_claim_in_progress_and_lets_it_complete() -> None:
    store = MemoryStore(max_entries=10, clock=FakeClock())
    running = [f"running{i}" for i in range(10)]
    tokens = await fill(store, running, payload=b"")
    with pytest.raises(StoreFullError):
        await store.claim("new", "fp", lease=10, ttl=1000)
    for key, token in zip(running, tokens, strict=True):
        assert await store.complete(key, token, b"done", ttl=1000)
    assert [record.state for record in [await store.get(key) for key in running] if record] == [State.COMPLETED] * 10


async def test_a_full_store_drops_expired_records_to_make_room() -> None:
    clock = FakeClock()
    store = MemoryStore(max_entries=10, clock=clock)
    await fill(store, [f"old{i}" for i in range(5)], ttl=10)
    kept = [f"kept{i}" for i in range(5)]
    await fill(store, kept, ttl=1000)
    clock.now += 10
    await fill(store, ["new"])
    assert await live_keys(store, [*kept, "new"]) == [*kept, "new"]
    assert len(store._records) == 6
    assert store.bytes_used == counted(store)


async def test_a_full_store_looks_for_expired_records_at_most_once_a_second() -> None:
    """A flood of refused claims must not make each of them walk every record: after a sweep that freed nothing,
    the next one waits a second of the store's clock, even if records expired meanwhile."""
    clock = FakeClock()
    store = MemoryStore(max_entries=10, clock=clock)
    await fill(store, [f"k{i}" for i in range(10)], ttl=0.5)
    clock.now += 0.25
    with pytest.raises(StoreFullError):  # swept: nothing had expired
        await store.claim("new", "fp", lease=10, ttl=1000)
    clock.now += 0.5  # every record has expired now, but the last sweep was 0.5 s ago
    with pytest.raises(StoreFullError):
        await store.claim("new", "fp", lease=10, ttl=1000)
    assert len(store._records) == 10
    clock.now += 0.5
    assert isinstance(await store.claim("new", "fp", lease=10, ttl=1000), Acquired)
    assert list(store._records) == ["new"]


async def test_a_stale_claim_is_taken_over_in_a_full_store() -> None:
    """Taking over a stale claim makes no new record: a full store allows it (its owner died or hung)."""
    clock = FakeClock()
    store = MemoryStore(max_entries=2, clock=clock)
    old = token_of(await store.claim("stale", "fp", lease=5, ttl=1000))
    await fill(store, ["done"])
    clock.now += 5
    new = token_of(await store.claim("stale", "fp", lease=5, ttl=1000))
    assert new != old
    assert store.bytes_used == counted(store)


@pytest.mark.parametrize("max_entries", [0, -1])
def test_max_entries_below_one_is_refused(max_entries: int) -> None:
    with pytest.raises(ConfigurationError, match="max_entries"):
        MemoryStore(max_entries=max_entries)


# -- the bound on bytes ------------------------------------------------------------------------------------------


async def test_new_keys_stop_at_seven_eighths_of_max_bytes_and_no_record_is_dropped() -> None:
    """A claim is admitted while the store, with it, stays within 7/8 of max_bytes; its result may then take the
    store up to max_bytes."""
    store = MemoryStore(max_bytes=256 * KIB, clock=FakeClock())
    accepted: list[str] = []
    while True:
        key = f"k{len(accepted)}"
        charge = _RECORD_BYTES + _RESULT_ROOM + len(key) + len("fp")
        before = store.bytes_used
        if before + charge > 224 * KIB:
            with pytest.raises(StoreFullError, match="a new key does not fit"):
                await store.claim(key, "fp", lease=10, ttl=1000)
            break
        token = token_of(await store.claim(key, "fp", lease=10, ttl=1000))
        assert await store.complete(key, token, bytes(8 * KIB), ttl=1000)
        assert store.bytes_used <= 256 * KIB
        accepted.append(key)
    assert 24 < len(accepted) < 28  # 224 KiB of 8 KiB payloads, each with its record, and the last one's result
    assert await live_keys(store, accepted) == accepted
    assert store.bytes_used == counted(store)


async def test_a_result_that_does_not_fit_is_refused_and_its_claim_stays() -> None:
    """Claims are admitted on what they cost then; the results of many claims running at once may not all fit. A
    result that does not fit raises StoreFullError and leaves the claim as it was: its owner can still complete it
    with a few bytes (the "not stored" marker of the middleware and the decorator), which always land."""
    store = MemoryStore(max_bytes=256 * KIB, clock=FakeClock())
    keys = [f"k{i}" for i in range(40)]
    tokens = await fill(store, keys, payload=b"")
    outcomes = []
    for key, token in zip(keys, tokens, strict=True):
        try:
            outcomes.append(await store.complete(key, token, bytes(16 * KIB), ttl=1000))
        except StoreFullError:
            record = await store.get(key)
            assert record is not None
            assert (record.state, record.token) == (State.IN_PROGRESS, token)
            assert await store.complete(key, token, b"\x02\x00\xc8\x01", ttl=1000)  # a marker's few bytes
            outcomes.append(False)
        assert store.bytes_used <= 256 * KIB
    assert 10 < outcomes.count(True) < 16  # up to max_bytes (not only 7/8 of it), never beyond
    assert all(record.state is State.COMPLETED for record in [await store.get(key) for key in keys] if record)
    assert store.bytes_used == counted(store)


async def test_results_up_to_the_room_counted_at_the_claim_always_land() -> None:
    store = MemoryStore(max_bytes=64 * KIB, clock=FakeClock())
    tokens: list[str] = []
    with pytest.raises(StoreFullError):  # noqa: PT012 - claim until refused
        while True:
            tokens.append(token_of(await store.claim(f"k{len(tokens)}", "fp", lease=10, ttl=1000)))
    for index, token in enumerate(tokens):
        assert await store.complete(f"k{index}", token, bytes(_RESULT_ROOM), ttl=1000)
    assert store.bytes_used == counted(store) <= 64 * KIB


async def test_the_byte_count_follows_every_operation() -> None:
    """Claims, takeovers, renewals, completions, releases, deletions, expiry (met by get, claim and purge), refusals
    and close: after each, the count is what the records hold."""
    clock = FakeClock()
    store = MemoryStore(max_entries=50, max_bytes=128 * KIB, clock=clock)
    rng = random.Random(12)
    tokens: dict[str, str] = {}
    for _ in range(3000):
        key = f"key-{rng.randrange(60)}"
        operation = rng.randrange(9)
        try:
            if operation <= 2:
                claim = await store.claim(key, "f" * rng.randrange(1, 80), lease=rng.choice([1, 5]), ttl=20)
                if isinstance(claim, Acquired):
                    tokens[key] = claim.token
            elif operation <= 4 and key in tokens:
                await store.complete(key, tokens[key], bytes(rng.choice([0, 10, 300, 4000])), ttl=rng.choice([2, 20]))
            elif operation == 5 and key in tokens:
                await store.renew(key, tokens[key], lease=5)
            elif operation == 6 and key in tokens:
                await store.release(key, tokens[key])
            elif operation == 7:
                await (store.delete(key) if rng.random() < 0.3 else store.get(key))
            else:
                clock.now += rng.random()
                if rng.random() < 0.05:
                    await store.purge_expired()
        except StoreFullError:
            pass
        assert store.bytes_used == counted(store)
        assert store.bytes_used <= 128 * KIB
        assert len(store._records) <= 50
    await store.close()
    assert store.bytes_used == 0


def test_max_bytes_below_64_kib_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="max_bytes must be at least 65536"):
        MemoryStore(max_bytes=64 * KIB - 1)


# -- a flood through the middleware ------------------------------------------------------------------------------


class SizedApp:
    """Answers ``POST /<size>`` with a body of *size* bytes that names the execution, and counts executions per
    caller (the ``X-User`` header)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.all_running = asyncio.Event()
        self.expected = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = dict(scope["headers"]).get(b"x-user", b"").decode()
        self.calls[user] += 1
        while (await receive()).get("more_body"):
            pass
        if self.gate is not None:
            self.running += 1
            if self.running == self.expected:
                self.all_running.set()
            await self.gate.wait()
        head = f"{user} call {self.calls[user]} ".encode()
        body = head + b"." * (int(scope["path"].strip("/")) - len(head))
        start: Message = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        await send(start)
        await send({"type": "http.response.body", "body": body})


def by_user(scope: Scope) -> bytes:
    user: bytes = dict(scope["headers"]).get(b"x-user", b"")
    return user


def keyed(user: str, key: str) -> dict[str, str]:
    return {"X-User": user, "Idempotency-Key": key}


async def test_a_flood_gets_503s_and_never_costs_another_caller_a_completed_record() -> None:
    """Alice's completed requests are replayed after Mallory filled the store with large responses (her app count
    does not grow); Mallory gets 503s once the store is full, every response of Mallory's that ran is kept, and
    the store never counts more than ``max_bytes``."""
    clock = FakeClock()
    store = MemoryStore(max_bytes=4 * MIB, clock=clock)
    app = SizedApp()
    async with client_for(IdempotencyMiddleware(app, store=store, principal=by_user, ttl=60)) as client:
        alice = [await client.post(f"/{100 * KIB}", headers=keyed("alice", f"a{i}")) for i in range(3)]
        assert [response.status_code for response in alice] == [200, 200, 200]

        flood = []
        for i in range(40):
            flood.append(await client.post(f"/{256 * KIB}", headers=keyed("mallory", f"m{i}")))
            assert store.bytes_used <= 4 * MIB
        ran = [response for response in flood if response.status_code == 200]
        refused = [response for response in flood if response.status_code != 200]
        assert 8 <= len(ran) < 14  # 7/8 of 4 MiB, less Alice's 300 KiB, in 256 KiB responses
        assert flood[: len(ran)] == ran  # the store filled up, then refused
        for response in refused:
            assert "memory store full" not in problem_of(response, 503, "store-unavailable")["detail"]
            assert int(response.headers["retry-after"]) >= 1
        assert app.calls["mallory"] == len(ran)

        replays = [await client.post(f"/{100 * KIB}", headers=keyed("alice", f"a{i}")) for i in range(3)]
        assert [response.content for response in replays] == [response.content for response in alice]
        assert all(response.headers["idempotent-replayed"] == "true" for response in replays)
        assert app.calls["alice"] == 3
        again = [await client.post(f"/{256 * KIB}", headers=keyed("mallory", f"m{i}")) for i in range(len(ran))]
        assert [response.content for response in again] == [response.content for response in ran]
        assert app.calls["mallory"] == len(ran)

        # A full store refuses Alice's new keys as well, until records expire; then everyone gets room again.
        problem_of(await client.post(f"/{KIB}", headers=keyed("alice", "a-new")), 503, "store-unavailable")
        clock.now += 61
        assert (await client.post(f"/{KIB}", headers=keyed("alice", "a-new"))).status_code == 200
        assert (await client.post(f"/{KIB}", headers=keyed("mallory", "m-new"))).status_code == 200
    assert store.bytes_used == counted(store) <= 4 * MIB


async def test_a_flood_of_requests_at_once_keeps_the_store_bounded_and_runs_nothing_twice() -> None:
    """Thirty 256 KiB responses claimed at once (each claim is small) do not all fit in 4 MiB: those that do not are
    refused by the store, the middleware keeps that the request ran instead, and a retry gets a 410, never a second
    run. Every client got its whole response the first time."""
    store = MemoryStore(max_bytes=4 * MIB)
    app = SizedApp()
    app.gate, app.expected = asyncio.Event(), 30
    async with client_for(IdempotencyMiddleware(app, store=store, principal=by_user)) as client:
        first = [
            asyncio.create_task(client.post(f"/{256 * KIB}", headers=keyed("mallory", f"m{i}"))) for i in range(30)
        ]
        async with asyncio.timeout(10):
            await app.all_running.wait()
        app.gate.set()
        answers = await asyncio.gather(*first)
        assert [response.status_code for response in answers] == [200] * 30
        assert all(len(response.content) == 256 * KIB for response in answers)
        assert store.bytes_used <= 4 * MIB
        app.gate = None
        retries = [await client.post(f"/{256 * KIB}", headers=keyed("mallory", f"m{i}")) for i in range(30)]
    replayed = [retry for retry, answer in zip(retries, answers, strict=True) if retry.content == answer.content]
    assert 12 <= len(replayed) < 16  # as many as fit in the whole 4 MiB
    for retry in retries:
        if retry not in replayed:
            assert problem_of(retry, 410, "response-not-stored")["original_status"] == 200
    assert app.calls["mallory"] == 30
    assert store.bytes_used == counted(store) <= 4 * MIB


# -- options -----------------------------------------------------------------------------------------------------


async def test_url_options() -> None:
    store = store_from_url("memory://?max_entries=3&max_bytes=100000&single_process_check=false")
    assert isinstance(store, MemoryStore)
    assert repr(store) == "MemoryStore(max_entries=3, max_bytes=100000)"
    assert store.sync()._check_due is False
    await fill(store, ["a", "b", "c"])
    with pytest.raises(StoreFullError):
        await store.claim("d", "fp", lease=10, ttl=10)
    sync = sync_store_from_url("memory://?max_bytes=70000")
    assert repr(sync) == "SyncMemoryStore(max_entries=100000, max_bytes=70000)"
    default = store_from_url("memory://")
    assert (
        repr(default)
        == f"MemoryStore(max_entries={MAX_ENTRIES}, max_bytes={MAX_BYTES})"
        == ("MemoryStore(max_entries=100000, max_bytes=67108864)")
    )


async def test_url_options_yield_to_keyword_options() -> None:
    store = store_from_url("memory://?max_entries=3&max_bytes=70000", max_entries=100, max_bytes=200_000)
    assert repr(store) == "MemoryStore(max_entries=100, max_bytes=200000)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://?max_bytes=lots", "not a whole number"),
        ("memory://?max_bytes=1000", "at least 65536"),
        ("memory://?single_process_check=maybe", "not true or false"),
    ],
)
def test_invalid_url_options(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        store_from_url(url)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("YES", True), ("On", True), ("false", False), ("0", False), ("no", False)],
)
def test_bool_options(value: str, expected: bool) -> None:
    assert parse_store_url(f"memory://?flag={value}").bool_option("flag", not expected) is expected
    assert parse_store_url("memory://").bool_option("flag", expected) is expected


# -- the caller's fencing token ----------------------------------------------------------------------------------


async def test_claim_takes_the_callers_token() -> None:
    """The middleware draws the token itself so that it can release a claim whose reply it never got."""
    store = MemoryStore()
    assert await store.claim("k", "fp", lease=10, ttl=60, token="caller-drawn") == Acquired("caller-drawn")
    assert record_of(await store.claim("k", "fp", lease=10, ttl=60, token="another")).token == "caller-drawn"
    assert await store.release("k", "caller-drawn")
    assert store.sync().claim("k", "fp", lease=10, ttl=60, token="sync-drawn") == Acquired("sync-drawn")
    assert await store.complete("k", "sync-drawn", b"r", ttl=60)
    assert isinstance(await store.claim("k", "fp", lease=10, ttl=60, token="late"), Existing)
    drawn = token_of(await store.claim("other", "fp", lease=10, ttl=60))
    assert len(drawn) == 32


# -- several workers ---------------------------------------------------------------------------------------------

# A parent that made a memory store and used it (as gunicorn --preload's master may), then forks children: each
# child claims once every child exists, and completes the parent's claim (only claims are refused); it reports and
# stays alive until the parent has every report. Then every child but the first exits, and the first claims again
# (a second later, as far as the store knows): it reports that too.
_FORKING = textwrap.dedent(
    """
    import os, socket, sys
    from idempo import StoreError
    from idempo.stores.memory import SyncMemoryStore

    children, sockets, check = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "check"
    listener = socket.create_server(("127.0.0.1", 0)) if sockets == "shared" else None
    store = SyncMemoryStore(single_process_check=check)
    token = store.claim("parent", "fp", lease=30, ttl=60).token
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()
    again_r, again_w = os.pipe()


    def claim(key):
        try:
            store.claim(key, "fp", lease=30, ttl=60)
        except StoreError as exc:
            return "refused" if "one of several workers" in str(exc) else repr(exc)
        return "claimed"


    pids = []
    for index in range(children):
        pid = os.fork()
        if pid == 0:
            own = socket.create_server(("127.0.0.1", 0)) if sockets == "own" else None
            os.close(go_w)
            os.close(done_w)
            os.read(go_r, 1)
            verdict = claim(f"child{index}")
            completed = store.complete("parent", token, b"r", ttl=60)
            os.write(report_w, f"{verdict}{'' if completed else '-but-not-completed'}\\n".encode())
            if index == 0:
                os.read(again_r, 1)
                store._recheck_at = float("-inf")
                os.write(report_w, f"{claim('again')}\\n".encode())
            else:
                os.read(done_r, 1)
            os._exit(0)
        pids.append(pid)
    os.write(go_w, b"x" * children)
    reports = b""
    while reports.count(b"\\n") < children:
        reports += os.read(report_r, 4096)
    os.close(done_w)
    for pid in pids[1:]:
        os.waitpid(pid, 0)
    os.write(again_w, b"x")
    while reports.count(b"\\n") < children + 1:
        reports += os.read(report_r, 4096)
    os.waitpid(pids[0], 0)
    first, last = reports.decode().splitlines()[:children], reports.decode().splitlines()[-1]
    print(" ".join(sorted(first)), "then", last)
    """
)


def forked_verdicts(children: int, sockets: str, *, check: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _FORKING, str(children), sockets, "check" if check else "nocheck"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_forked_children_that_share_a_listening_socket_refuse_new_keys_while_they_are_several() -> None:
    """As gunicorn --preload's workers: both children hold the socket the parent listens on. Both refuse new keys
    (and still complete a claim made before); once one is gone, the other accepts new keys again."""
    assert forked_verdicts(2, "shared") == "refused refused then claimed"


def test_one_forked_child_is_not_flagged() -> None:
    """As gunicorn --preload with one worker: the parent holds the socket too, but a parent is no sibling."""
    assert forked_verdicts(1, "shared") == "claimed then claimed"


def test_siblings_with_listening_sockets_of_their_own_are_not_flagged() -> None:
    """Two servers started side by side (or two test processes that each listen) do not share records' keys."""
    assert forked_verdicts(2, "own") == "claimed claimed then claimed"


def test_siblings_without_a_listening_socket_are_not_flagged() -> None:
    """Test runners, scripts and job workers have no listening socket: nothing to flag."""
    assert forked_verdicts(2, "none") == "claimed claimed then claimed"


def test_the_check_can_be_turned_off() -> None:
    assert forked_verdicts(2, "shared", check=False) == "claimed claimed then claimed"


def test_this_test_process_finds_no_other_worker() -> None:
    """The pytest process, even while it listens, shares that socket with nobody."""
    with socket.create_server(("127.0.0.1", 0)):
        assert other_workers() == []


def test_looking_for_other_workers_keeps_this_processs_sqlite_locks(tmp_path: Path) -> None:
    """The search reads this process's descriptors without copying and closing any: closing a copy of a SQLite
    file's descriptor would drop every lock this process holds on it, so that another process, closing its last
    connection, takes itself for the last one and deletes the WAL under this one's connection, which then never
    sees the rows written after (a Django app on SQLite with a memory:// store, in the Django tests)."""
    import sqlite3

    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        with socket.create_server(("127.0.0.1", 0)):  # a listening socket, so that the search looks further
            assert other_workers() == []
        for end in ("c.close()", "os._exit(0)"):  # one process closes (the last one?), the next leaves its WAL
            code = f"import os, sqlite3; c = sqlite3.connect({str(db)!r}, isolation_level=None); "
            subprocess.run([sys.executable, "-c", code + f"c.execute('INSERT INTO t VALUES (2)'); {end}"], check=True)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (3,)
    finally:
        conn.close()
