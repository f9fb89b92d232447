"""PostgresStore and its sync twin against a real PostgreSQL server: the conformance suite, races, failures and
recovery. The scenarios both stores share are written once and run on each (the ``twin`` fixture);
``test_store_postgres_sync.py`` has what only the sync store does.

Every test uses a table of its own, with a name unique to the run, and drops it at the end, so that runs never
collide and the ``test`` database is left as it was found.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import idempo
from idempo import (
    Acquired,
    ConfigurationError,
    Existing,
    IdempotencyMiddleware,
    MissingDependency,
    State,
    Store,
    StoreError,
    store_from_url,
)
from idempo.stores import ScanningStore, SyncScanningStore, SyncStore
from idempo.stores import _postgres_operations as operations_module
from idempo.stores.postgres import PostgresStore, SyncPostgresStore
from idempo.testing import StoreConformance
from tests.support.environment import with_options
from tests.support.stores import TWINS, FakeClock, Twin, drop_table, new_table, record_of, token_of

HANG_GUARD = 60.0  # seconds: a test that waits this long has hung; no test expects to come near it

Scenario = Generator[Any, Any, None]


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> Twin:
    """The async store, or its sync twin: each scenario that takes it runs on both."""
    return Twin(request.param, guard=HANG_GUARD)


def opened(twin: Twin, conninfo: str, **options: Any) -> Any:
    """A :class:`PostgresStore`, or a :class:`SyncPostgresStore`, with these options."""
    return (PostgresStore if twin.is_async else SyncPostgresStore)(conninfo, **options)


def driver_error(twin: Twin, psycopg_error: type[Exception], asyncpg_error: type[Exception]) -> type[Exception]:
    """The client's exception a store error of *twin* has as its cause: the async store's client is asyncpg, the
    sync store's psycopg."""
    return asyncpg_error if twin.is_async else psycopg_error


@pytest.fixture
def sync_admin(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A blocking connection of the test's own, beside the store's (usable from a scenario on either store)."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the test's own, beside the store's."""
    conn = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
    yield conn
    await conn.close()


@pytest.fixture
async def store(postgres_url: str, table: str) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(postgres_url, table=table)
    yield opened
    await opened.close()


# -- the conformance suite ----------------------------------------------------------------------------------------


class TestPostgresStore(StoreConformance):
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

    async def open_store(self) -> Store:
        return store_from_url(self.url)


class TestPostgresStoreUnprepared(TestPostgresStore):
    """``prepare=false``, ``min_size=0``: as behind PgBouncer in transaction mode."""

    async def open_store(self) -> Store:
        return store_from_url(with_options(self.url, prepare="false", min_size=0))


# -- exact semantics, on a fake clock -----------------------------------------------------------------------------


@pytest.fixture
async def clocked(postgres_url: str, table: str) -> AsyncIterator[tuple[PostgresStore, FakeClock]]:
    clock = FakeClock()
    opened = PostgresStore(postgres_url, table=table, clock=clock)
    yield opened, clock
    await opened.close()


async def test_stale_owner_not_taken_over_still_completes(clocked: tuple[PostgresStore, FakeClock]) -> None:
    store, clock = clocked
    token = token_of(await store.claim("k", "fp", lease=10, ttl=100))
    clock.now += 50
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.token) == (State.IN_PROGRESS, token)
    assert await store.complete("k", token, b"late", ttl=100)
    assert record_of(await store.claim("k", "fp", lease=10, ttl=100)).payload == b"late"


def test_purge_expired_counts_exactly_what_it_removes(
    twin: Twin, postgres_url: str, table: str, sync_admin: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    store = opened(twin, postgres_url, table=table, clock=clock)
    monkeypatch.setattr(operations_module, "_PURGE_BATCH", 2)  # several batches

    def scenario() -> Scenario:
        assert (yield store.purge_expired()) == 0
        for key in ("a", "b", "c"):
            yield store.claim(key, "fp", lease=10, ttl=20)
        assert (yield store.complete("d", token_of((yield store.claim("d", "fp", lease=10, ttl=1000))), b"", ttl=5))
        live = token_of((yield store.claim("live", "fp", lease=10, ttl=20)))
        assert (yield store.complete("live", live, b"kept", ttl=1000))
        clock.now += 20
        assert (yield store.purge_expired()) == 4  # a, b, c in progress and d completed, all past their TTL
        assert (yield store.purge_expired()) == 0
        query = psycopg.sql.SQL("SELECT key FROM {}").format(psycopg.sql.Identifier(table))
        assert sync_admin.execute(query).fetchall() == [("live",)]
        yield store.close()

    twin.run(scenario())


async def test_concurrent_takeover_of_a_stale_key_has_one_winner(clocked: tuple[PostgresStore, FakeClock]) -> None:
    store, clock = clocked
    old = token_of(await store.claim("k", "fp", lease=10, ttl=100))
    clock.now += 10
    claims = await asyncio.gather(*(store.claim("k", "new", lease=10, ttl=100) for _ in range(200)))
    winners = [claim.token for claim in claims if isinstance(claim, Acquired)]
    assert len(winners) == 1
    assert winners[0] != old
    assert {record_of(claim).token for claim in claims if isinstance(claim, Existing)} == {winners[0]}


# -- races ----------------------------------------------------------------------------------------------------------


def test_concurrent_claims_over_ten_connections_have_one_winner(twin: Twin, postgres_url: str, table: str) -> None:
    """200 tasks of the loop, or 100 threads, claim one key at once, round after round."""
    store = opened(twin, postgres_url, table=table, min_size=10, max_size=10)
    claimants, rounds = (200, 5) if twin.is_async else (100, 3)
    statements = itertools.count()
    # Count the statements, to show the retries: where the async store runs every one of them (a plan's step, or
    # the one a claim makes outside its plan), where the sync store runs a plan's step.
    name = "_on" if twin.is_async else "_perform"
    run_statement = getattr(store, name)

    def counting(*args: Any) -> Any:
        next(statements)  # atomic, from any thread
        return run_statement(*args)

    setattr(store, name, counting)

    def scenario() -> Scenario:
        for round_ in range(rounds):
            key = f"race-{round_}"
            claims = yield twin.all([functools.partial(store.claim, key, "fp", lease=60, ttl=60)] * claimants)
            winners = [claim.token for claim in claims if isinstance(claim, Acquired)]
            assert len(winners) == 1, f"{len(winners)} winners in round {round_}"
            losers = [record_of(claim) for claim in claims if isinstance(claim, Existing)]
            assert len(losers) == claimants - 1
            assert {(r.key, r.state, r.token) for r in losers} == {(key, State.IN_PROGRESS, winners[0])}
        yield store.close()

    twin.run(scenario())
    # More when a claim met a winner committed after its snapshot and looked again.
    assert next(statements) >= rounds * claimants


_OPENER = """
import asyncio, sys
from idempo.stores.postgres import PostgresStore

async def main(url, table):
    store = PostgresStore(url, table=table)
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal
    await store.get("k")
    await store.close()
    print("ok", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_many_stores_create_one_new_table_at_once(
    postgres_url: str, table: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    stores = [PostgresStore(postgres_url, table=table) for _ in range(12)]
    try:
        results = await asyncio.gather(*(s.get("k") for s in stores), return_exceptions=True)
    finally:
        for s in stores:
            await s.close()
    assert results == [None] * len(stores)
    indexes = await (
        await admin.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname", [table])
    ).fetchall()
    assert [row[0].split(" USING ")[1] for row in indexes] == ["btree (expires_at)", "btree (key)"]


def test_processes_create_one_new_table_at_once(postgres_url: str, table: str) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, postgres_url, table],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n", process.communicate(timeout=30)
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Nothing on stderr either: no traceback, and no "relation already exists" notice.
    assert [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)] == [
        (0, "ok\n", "")
    ] * len(processes)


# -- the table --------------------------------------------------------------------------------------------------------


async def test_purge_uses_the_index_on_expires_at(store: PostgresStore, admin: psycopg.AsyncConnection[Any]) -> None:
    await store.get("k")  # makes the table
    table = psycopg.sql.Identifier(store._table)
    insert = psycopg.sql.SQL(
        "INSERT INTO {} SELECT 'k' || i, 1, 'fp', '', 0, 0, extract(epoch FROM now()) + i, 'x'"
        " FROM generate_series(1, 5000) AS i"
    ).format(table)
    await admin.execute(insert)
    await admin.execute(psycopg.sql.SQL("ANALYZE {}").format(table))
    plan = await (await admin.execute(b"EXPLAIN " + store._sql.purge, {"now": None, "batch": 10_000})).fetchall()
    text = "\n".join(row[0] for row in plan)
    # The expired rows are found by a range scan of the index, and deleted by their row addresses.
    assert f"Index Scan using {store._table}_expires_at" in text, text
    assert "Index Cond: (expires_at <= " in text, text
    assert "Tid Scan" in text, text
    assert "Seq Scan" not in text, text


async def test_table_name_is_quoted(postgres_url: str, admin: psycopg.AsyncConnection[Any]) -> None:
    """A mixed-case name is kept as written (psycopg.sql.Identifier), not folded to lower case."""
    name = "Idempo_Mixed_" + uuid.uuid4().hex[:8]
    store = PostgresStore(postgres_url, table=name)
    try:
        assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Acquired)
        found = await (await admin.execute("SELECT count(*) FROM pg_tables WHERE tablename = %s", [name])).fetchone()
        assert found == (1,)
    finally:
        await store.close()
        drop_table(postgres_url, name)


# -- failures and recovery --------------------------------------------------------------------------------------


def backends_of(admin: psycopg.Connection[Any], application_name: str) -> list[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name]).fetchall()
    return [row[0] for row in rows]


def terminate(admin: psycopg.Connection[Any], application_name: str) -> int:
    """Terminate the store's connections, and wait until they are gone."""
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name = %s",
        [application_name],
    ).fetchall()
    assert all(row[0] for row in rows), rows
    return len(rows)


def test_terminated_idle_connections_are_replaced(
    twin: Twin, postgres_url: str, table: str, sync_admin: psycopg.Connection[Any]
) -> None:
    name = f"idempo-test-{uuid.uuid4().hex[:8]}"
    store = opened(twin, postgres_url, table=table, application_name=name, min_size=3, max_size=3)

    def scenario() -> Scenario:
        try:
            token = token_of((yield store.claim("k", "fp", lease=60, ttl=60)))
            yield twin.all(lambda: store.get("k") for _ in range(10))  # all three connections in use
            assert len(backends_of(sync_admin, name)) == 3
            assert terminate(sync_admin, name) == 3
            # The store notices, before using them, that the server closed its idle connections.
            assert (yield store.complete("k", token, b"done", ttl=60))
            for _ in range(5):
                assert record_of((yield store.claim("k", "fp", lease=60, ttl=60))).payload == b"done"
        finally:
            yield store.close()

    twin.run(scenario())


def test_backend_terminated_during_a_statement(
    twin: Twin, postgres_url: str, table: str, sync_admin: psycopg.Connection[Any]
) -> None:
    name = f"idempo-test-{uuid.uuid4().hex[:8]}"
    store = opened(twin, postgres_url, table=table, application_name=name, max_size=1, statement_timeout=30)

    def scenario() -> Scenario:
        token = token_of((yield store.claim("k", "fp", lease=60, ttl=60)))
        with psycopg.connect(postgres_url) as locker:
            try:
                locker.execute(
                    psycopg.sql.SQL("SELECT 1 FROM {} WHERE key = 'k' FOR UPDATE").format(psycopg.sql.Identifier(table))
                )
                completing = twin.start(lambda: store.complete("k", token, b"done", ttl=60))
                yield from wait_for_lock_wait(twin, sync_admin, name)
                terminate(sync_admin, name)
                with pytest.raises(StoreError) as raised:
                    yield twin.outcome(completing)
                cause = driver_error(twin, psycopg.OperationalError, asyncpg.ConnectionDoesNotExistError)
                assert isinstance(raised.value.__cause__, cause)
                locker.rollback()
                assert (yield store.complete("k", token, b"done", ttl=60))  # rolled back: do it again
            finally:
                yield store.close()

    twin.run(scenario())


def wait_for_lock_wait(twin: Twin, admin: psycopg.Connection[Any], application_name: str) -> Scenario:
    """Poll, with a deadline, until one of the store's statements waits for a lock (yielding the event loop, if
    there is one, between looks)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 10
    while admin.execute(query, [application_name]).fetchone() != (1,):
        assert time.monotonic() < deadline, "the store's statement never waited for the lock"
        yield twin.pause(0.01)


def test_statement_timeout_is_honoured(twin: Twin, postgres_url: str, table: str) -> None:
    name = f"idempo-test-{uuid.uuid4().hex[:8]}"
    store = twin.open(with_options(postgres_url, table=table, statement_timeout=0.3, application_name=name))

    def scenario() -> Scenario:
        token = token_of((yield store.claim("k", "fp", lease=60, ttl=60)))
        with psycopg.connect(postgres_url) as locker:
            try:
                locker.execute(
                    psycopg.sql.SQL("SELECT 1 FROM {} WHERE key = 'k' FOR UPDATE").format(psycopg.sql.Identifier(table))
                )
                with pytest.raises(StoreError, match="complete") as raised:
                    yield store.complete("k", token, b"done", ttl=60)
                cause = driver_error(twin, psycopg.errors.QueryCanceled, asyncpg.QueryCanceledError)
                assert isinstance(raised.value.__cause__, cause)
                # Reads never wait for the lock: a replay or an in-progress answer comes at once.
                assert record_of((yield store.claim("k", "fp", lease=60, ttl=60))).token == token
                locker.rollback()
                assert (yield store.complete("k", token, b"done", ttl=60))
            finally:
                yield store.close()

    twin.run(scenario())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_server_is_a_store_error(twin: Twin) -> None:
    store = twin.open(f"postgresql://app:s3cr3t-pw@127.0.0.1:{closed_port()}/test?connect_timeout=2&pool_timeout=1")

    def scenario() -> Scenario:
        try:
            for _ in range(2):  # and again: nothing was left half open
                with pytest.raises(StoreError) as raised:
                    yield store.claim("k", "fp", lease=60, ttl=60)
                assert isinstance(raised.value.__cause__, driver_error(twin, psycopg.OperationalError, OSError))
                assert "s3cr3t-pw" not in str(raised.value)
                assert "s3cr3t-pw" not in str(raised.value.__cause__)
                assert "app:***@127.0.0.1" in str(raised.value)
        finally:
            yield store.close()

    twin.run(scenario())


def through(proxy: Proxy | ThreadedProxy, url: str) -> str:
    """*url*, with the proxy's address for the server's (credentials, database and options kept)."""
    netloc = urlsplit(url).netloc
    credentials = netloc.rpartition("@")[0]
    return url.replace(netloc, f"{credentials}{'@' if credentials else ''}127.0.0.1:{proxy.port}", 1)


class Proxy:
    """A TCP proxy in front of the server, to take it down and bring it back."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.frozen = False  # drop everything, as a frozen server or a broken network would
        self.accepted = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        self.tasks.update(pumps)
        await asyncio.gather(*pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.frozen:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    async def stop(self) -> None:
        """Stop listening and cut every connection, as a server crash would."""
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()


class ThreadedProxy:
    """A TCP proxy to the server, in threads (so that it serves a scenario on either store), that can be *frozen*:
    then it accepts connections and data, and forwards nothing (a hung server, or a network that drops everything)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = False
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self._sockets.append(client)
            if self.frozen:
                continue  # a connection that never hears anything
            server = socket.create_connection(self.upstream)
            self._sockets.append(server)
            for source, target in ((client, server), (server, client)):
                thread = threading.Thread(target=self._pump, args=(source, target))
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.frozen:
                    target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=HANG_GUARD)
        for sock in self._sockets:
            sock.close()
        self._listener.close()


async def test_store_recovers_when_the_server_comes_back(postgres_url: str, table: str) -> None:
    parts = urlsplit(postgres_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    url = through(proxy, postgres_url)
    store = PostgresStore(url, table=table, pool_timeout=0.5, reconnect_timeout=1, min_size=2)
    try:
        async with asyncio.timeout(HANG_GUARD):
            token = token_of(await store.claim("k", "fp", lease=60, ttl=60))
            await proxy.stop()
            for _ in range(3):
                with pytest.raises(StoreError, match="no connection within"):
                    await store.get("k")
            await proxy.start()  # the same port
            while True:  # the pool reconnects on its own, within about reconnect_timeout
                try:
                    assert await store.complete("k", token, b"done", ttl=60)
                    break
                except StoreError:
                    await asyncio.sleep(0.05)
            assert record_of(await store.claim("k", "fp", lease=60, ttl=60)).payload == b"done"
    finally:
        await store.close()
        await proxy.stop()


def test_server_that_does_not_answer(twin: Twin, postgres_url: str, table: str) -> None:
    parts = urlsplit(postgres_url)
    proxy = ThreadedProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    store = opened(
        twin, through(proxy, postgres_url), table=table, statement_timeout=0.3, pool_timeout=1, reconnect_timeout=1
    )

    def scenario() -> Scenario:
        token = token_of((yield store.claim("k", "fp", lease=60, ttl=60)))
        proxy.frozen = True
        with pytest.raises(StoreError, match=r"complete: no answer within 1\.3 s") as raised:
            yield store.complete("k", token, b"done", ttl=60)
        cause = driver_error(twin, psycopg.OperationalError, asyncpg.ConnectionDoesNotExistError)
        assert isinstance(raised.value.__cause__, cause)
        proxy.frozen = False
        while True:  # a new connection, once the pool has made one
            try:
                assert (yield store.complete("k", token, b"done", ttl=60))  # the first never reached the server
                break
            except StoreError:
                yield twin.pause(0.05)
        yield store.close()

    try:
        twin.run(scenario())
    finally:
        proxy.close()


def test_operations_waiting_for_the_first_connection_share_one_attempt(
    twin: Twin, postgres_url: str, table: str
) -> None:
    parts = urlsplit(postgres_url)
    proxy = ThreadedProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.frozen = True  # connections are accepted, and then nothing: each attempt waits out connect_timeout
    store = opened(twin, through(proxy, postgres_url), table=table, connect_timeout=2)

    def scenario() -> Scenario:
        results = yield twin.all(lambda: store.get("k") for _ in range(10))
        assert all(isinstance(result, StoreError) for result in results), results
        assert proxy.accepted == 1  # not ten attempts, one after the other
        proxy.frozen = False
        assert (yield store.get("k")) is None  # a new attempt, which succeeds
        yield store.close()

    try:
        twin.run(scenario())
    finally:
        proxy.close()


# -- lifecycle ------------------------------------------------------------------------------------------------------


def test_store_made_without_an_event_loop(postgres_url: str, table: str) -> None:
    """Created at import time, with no loop running: the pool opens in the loop of the first operation."""
    store = PostgresStore(postgres_url, table=table)

    async def use() -> None:
        assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Acquired)
        assert isinstance(await store.claim("k", "fp", lease=60, ttl=60), Existing)

    async def use_elsewhere() -> None:
        with pytest.raises(StoreError, match="another event loop"):
            await store.get("k")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(use())
        asyncio.run(use_elsewhere())
        loop.run_until_complete(store.close())
    finally:
        loop.close()


def test_close_is_idempotent_and_final(twin: Twin, postgres_url: str, table: str) -> None:
    def scenario() -> Scenario:
        unused = opened(twin, postgres_url, table=table)
        yield unused.close()
        yield unused.close()
        store = opened(twin, postgres_url, table=table)
        assert (yield store.get("k")) is None
        yield store.close()
        yield store.close()
        with pytest.raises(StoreError, match="closed"):
            yield store.get("k")

    twin.run(scenario())


def test_is_a_store(twin: Twin, postgres_url: str) -> None:
    assert isinstance(opened(twin, postgres_url), idempo.Store if twin.is_async else SyncStore)


def test_missing_psycopg_is_a_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("psycopg", "psycopg_pool", "asyncpg"):
        with monkeypatch.context() as patch:
            patch.delitem(sys.modules, "idempo.stores.postgres")
            patch.setitem(sys.modules, module, None)  # None in sys.modules blocks the import
            with pytest.raises(MissingDependency, match=r"pip install 'idempo\[postgres\]'") as raised:
                store_from_url("postgresql://db/app")
            assert isinstance(raised.value, ImportError)


# -- URLs -----------------------------------------------------------------------------------------------------------


def test_url_options_are_the_stores_and_the_rest_is_libpqs() -> None:
    store = store_from_url(
        "postgresql://app:pw@db:5433/idem?sslmode=disable&table=idem&min_size=2&max_size=3&connect_timeout=7"
        "&statement_timeout=0.5&pool_timeout=2&reconnect_timeout=4&prepare=false&application_name=api"
        "&options=-c%20search_path%3Dapp"
    )
    assert isinstance(store, PostgresStore)
    assert store._conninfo == (
        "postgresql://app:pw@db:5433/idem?sslmode=disable&application_name=api&options=-c%20search_path%3Dapp"
    )
    assert psycopg.conninfo.conninfo_to_dict(store._conninfo)["options"] == "-c search_path=app"
    assert (store._table, store._min_size, store._max_size) == ("idem", 2, 3)
    assert (store._connect_timeout, store._statement_timeout, store._pool_timeout) == (7, 0.5, 2.0)
    assert (store._reconnect_timeout, store._prepare, store._application_name) == (4.0, False, "api")


def test_url_defaults_and_scheme() -> None:
    for url in ("postgres://db/app", "PostgreSQL://db/app?table=idempo_records"):
        store = store_from_url(url)
        assert isinstance(store, PostgresStore)
        assert store._conninfo == f"{url.split(':')[0].lower()}://db/app"
        assert (store._table, store._min_size, store._max_size, store._prepare) == ("idempo_records", 1, 10, True)
        assert (store._connect_timeout, store._statement_timeout, store._pool_timeout) == (5, 5.0, 5.0)
        assert store._application_name == "idempo"


def test_keyword_options_override_the_url() -> None:
    store = store_from_url("postgresql://db/app?table=a&max_size=3", table="b", max_size=4)
    assert isinstance(store, PostgresStore)
    assert (store._table, store._max_size) == ("b", 4)


def test_key_value_conninfo() -> None:
    store = PostgresStore("host=db dbname=app application_name=api", table="t")
    assert store._application_name == "api"
    assert PostgresStore("host=db", application_name="mine")._application_name == "mine"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://db/app?table=bad-name", "table name"),
        ("postgresql://db/app?table=x;drop%20table%20y", "table name"),
        ("postgresql://db/app?table=" + "t" * 49, "table name"),
        ("postgresql://db/app?max_size=0", "max_size"),
        ("postgresql://db/app?min_size=5&max_size=2", "min_size"),
        ("postgresql://db/app?min_size=-1", "min_size"),
        ("postgresql://db/app?statement_timeout=0", "statement_timeout"),
        ("postgresql://db/app?pool_timeout=-1", "pool_timeout"),
        ("postgresql://db/app?connect_timeout=inf", "connect_timeout"),
        ("postgresql://db/app?reconnect_timeout=nan", "reconnect_timeout"),
        ("postgresql://db/app?pool_timeout=soon", "not a number"),
        ("postgresql://db/app?max_size=many", "not a whole number"),
        ("postgresql://u:s3cr3t@db/app?no_such_libpq_option=1", "invalid PostgreSQL connection string"),
    ],
)
def test_invalid_options_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        store_from_url(url)
    assert "s3cr3t" not in str(raised.value)


def test_passwords_never_show() -> None:
    assert repr(store_from_url("postgresql://app:s3cr3t@db/app?table=t")) == (
        "PostgresStore('postgresql://app:***@db/app', table='t')"
    )
    store = PostgresStore("host=db password='s3 cr3t' dbname=app")
    assert "s3" not in repr(store)
    assert "password=***" in repr(PostgresStore("host=db password=s3cr3t dbname=app"))


# -- the middleware on it -------------------------------------------------------------------------------------------


async def test_middleware_replays_from_postgres(store: PostgresStore) -> None:
    calls = 0

    async def create_order(request: Request) -> JSONResponse:
        nonlocal calls
        calls += 1
        return JSONResponse({"order": calls, "body": json.loads(await request.body())}, status_code=201)

    app = Starlette(
        routes=[Route("/orders", create_order, methods=["POST"])],
        middleware=[Middleware(IdempotencyMiddleware, store=store)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        headers = {"Idempotency-Key": "order-1"}
        first = await client.post("/orders", json={"item": "book"}, headers=headers)
        retry = await client.post("/orders", json={"item": "book"}, headers=headers)
        other = await client.post("/orders", json={"item": "pen"}, headers=headers)
    assert (first.status_code, first.json()) == (201, {"order": 1, "body": {"item": "book"}})
    assert (retry.status_code, retry.content) == (201, first.content)
    assert retry.headers.get("idempotent-replayed") == "true"
    assert other.status_code == 422
    assert calls == 1


# -- scan ---------------------------------------------------------------------------------------------------------


async def test_scan_pages_through_the_prefix(
    clocked: tuple[PostgresStore, FakeClock], admin: psycopg.AsyncConnection[Any], table: str
) -> None:
    """Keyset pages of 2 records: each record of the prefix is listed once, in the table's order; LIKE's
    wildcards and its escape character in the prefix are taken literally; expired records are absent."""
    store, clock = clocked
    assert isinstance(store, ScanningStore)
    store._scan_page_size = 2
    keys = ["p:%", "p:%a", "p:_", "p:_b", "p:!", "p:!%", "p:ab", "p:a", "p:x", "p:xx", "pX", "q:1", "p:short"]
    for key in keys:
        await store.claim(key, "fp", lease=10, ttl=1 if key == "p:short" else 100)
    scanned = [record.key async for record in store.scan("p:")]
    query = psycopg.sql.SQL("SELECT key FROM {} WHERE starts_with(key, 'p:') ORDER BY key")
    cursor = await admin.execute(query.format(psycopg.sql.Identifier(table)))
    assert scanned == [row[0] for row in await cursor.fetchall()]  # every one, once, in the table's order
    for prefix in ("p:%", "p:_", "p:!", "p:a", "p:x", "p", ""):
        found = [record.key async for record in store.scan(prefix)]
        assert sorted(found) == sorted(key for key in keys if key.startswith(prefix)), prefix
    assert [record.key async for record in store.scan("p:", limit=3)] == scanned[:3]
    clock.now += 1
    assert [record.key async for record in store.scan("p:")] == [key for key in scanned if key != "p:short"]
    twin = store.sync()
    twin._scan_page_size = 3
    assert [record.key for record in twin.scan("p:")] == [key for key in scanned if key != "p:short"]
    assert isinstance(twin, SyncScanningStore)


async def test_a_scan_that_fails_is_a_store_error(
    store: PostgresStore, admin: psycopg.AsyncConnection[Any], table: str, postgres_url: str
) -> None:
    await store.claim("k", "fp", lease=10, ttl=100)
    assert [record.key for record in store.sync().scan()] == ["k"]
    await admin.execute(psycopg.sql.SQL("DROP TABLE {}").format(psycopg.sql.Identifier(table)))
    with pytest.raises(StoreError, match="scan: UndefinedTable"):
        [record async for record in store.scan()]
    with pytest.raises(StoreError, match="scan: UndefinedTable"):
        list(store.sync().scan())
