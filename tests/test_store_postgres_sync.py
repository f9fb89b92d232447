"""SyncPostgresStore against a real PostgreSQL server: the conformance suite from real threads, a hundred threads
racing for one key, its async twin on the same table, a terminated backend, an unreachable server.

Every test uses a table of its own, with a name unique to the run, and drops it at the end.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import psycopg
import pytest

from idempo import Acquired, Claim, Existing, State, StoreError
from idempo.stores import SyncStore, sync_store_from_url
from idempo.stores.postgres import PostgresStore, SyncPostgresStore
from idempo.testing import SyncStoreConformance

from .conftest import with_options
from .stores_support import drop_table, new_table, record_of, token_of

HANG_GUARD = 60.0  # seconds: a test that waits this long has hung; no test expects to come near it

_T = TypeVar("_T")


def guarded(call: Callable[[], _T]) -> _T:
    """*call*'s result, run in a thread of its own, failing the test (instead of hanging it) after HANG_GUARD."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(call).result(timeout=HANG_GUARD)


@pytest.fixture
def admin(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own, beside the store's."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def store(postgres_url: str, table: str) -> Iterator[SyncPostgresStore]:
    opened = SyncPostgresStore(postgres_url, table=table)
    yield opened
    opened.close()


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


# -- races -----------------------------------------------------------------------------------------------------------


def test_a_hundred_threads_claiming_one_key_have_one_winner(postgres_url: str, table: str) -> None:
    store = SyncPostgresStore(postgres_url, table=table, min_size=10, max_size=10)
    threads = 100
    try:
        for round_ in range(3):
            key = f"race-{round_}"
            start = threading.Barrier(threads)

            def claim(key: str = key, start: threading.Barrier = start) -> Claim:
                start.wait(timeout=HANG_GUARD)
                return store.claim(key, "fp", lease=60, ttl=60)

            with ThreadPoolExecutor(threads) as executor:
                futures = [executor.submit(claim) for _ in range(threads)]
                claims = [future.result(timeout=HANG_GUARD) for future in futures]
            winners = [claim.token for claim in claims if isinstance(claim, Acquired)]
            assert len(winners) == 1, f"{len(winners)} winners in round {round_}"
            losers = [record_of(claim) for claim in claims if isinstance(claim, Existing)]
            assert len(losers) == threads - 1
            assert {(r.key, r.state, r.token) for r in losers} == {(key, State.IN_PROGRESS, winners[0])}
    finally:
        store.close()


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


def terminate(admin: psycopg.Connection[Any], application_name: str) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name = %s",
        [application_name],
    ).fetchall()
    assert all(row[0] for row in rows), rows
    return len(rows)


def test_terminated_backend(postgres_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    name = f"idempo-test-{uuid.uuid4().hex[:8]}"
    store = SyncPostgresStore(postgres_url, table=table, application_name=name, min_size=2, max_size=2)

    def scenario() -> None:
        token = token_of(store.claim("k", "fp", lease=60, ttl=60))
        assert terminate(admin, name) >= 1
        error: StoreError | None = None
        try:  # the store notices the dead connection before it uses it; if not, one StoreError at most
            store.renew("k", token, lease=60)
        except StoreError as exc:
            error = exc
        assert error is None or isinstance(error.__cause__, psycopg.OperationalError), error
        assert store.complete("k", token, b"done", ttl=60)
        for _ in range(5):
            assert record_of(store.claim("k", "fp", lease=60, ttl=60)).payload == b"done"

    try:
        guarded(scenario)
    finally:
        store.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_server_is_a_store_error() -> None:
    url = f"postgresql://app:s3cr3t-pw@127.0.0.1:{closed_port()}/test?connect_timeout=2&pool_timeout=1"
    store = sync_store_from_url(url)

    def claim() -> StoreError:
        with pytest.raises(StoreError) as raised:
            store.claim("k", "fp", lease=60, ttl=60)
        return raised.value

    try:
        for _ in range(2):  # and again: nothing was left half open
            error = guarded(claim)
            assert isinstance(error.__cause__, psycopg.OperationalError)
            assert "s3cr3t-pw" not in str(error)
            assert "s3cr3t-pw" not in str(error.__cause__)
            assert "app:***@127.0.0.1" in str(error)
    finally:
        store.close()


class Proxy:
    """A TCP proxy to the server, in threads, that can be *frozen*: then it accepts connections and data, and
    forwards nothing (a hung server, or a network that drops everything)."""

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


def through(proxy: Proxy, url: str) -> str:
    """*url*, with the proxy's address for the server's (credentials, database and options kept)."""
    netloc = urlsplit(url).netloc
    credentials = netloc.rpartition("@")[0]
    return url.replace(netloc, f"{credentials}{'@' if credentials else ''}127.0.0.1:{proxy.port}", 1)


def test_server_that_does_not_answer(postgres_url: str, table: str) -> None:
    parts = urlsplit(postgres_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    store = SyncPostgresStore(
        through(proxy, postgres_url), table=table, statement_timeout=0.3, pool_timeout=1, reconnect_timeout=1
    )

    def scenario() -> None:
        token = token_of(store.claim("k", "fp", lease=60, ttl=60))
        proxy.frozen = True
        with pytest.raises(StoreError, match=r"complete: no answer within 1\.3 s") as raised:
            store.complete("k", token, b"done", ttl=60)
        assert isinstance(raised.value.__cause__, psycopg.OperationalError)
        proxy.frozen = False
        while True:  # a new connection, once the pool has made one
            try:
                assert store.complete("k", token, b"done", ttl=60)  # the first never reached the server
                break
            except StoreError:
                time.sleep(0.05)

    try:
        guarded(scenario)
    finally:
        store.close()
        proxy.close()


def test_threads_waiting_for_the_first_connection_share_one_attempt(postgres_url: str, table: str) -> None:
    parts = urlsplit(postgres_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.frozen = True  # connections are accepted, and then nothing: each attempt waits out connect_timeout
    store = SyncPostgresStore(through(proxy, postgres_url), table=table, connect_timeout=2)

    def get() -> BaseException | None:
        try:
            store.get("k")
        except StoreError as exc:
            return exc
        return None

    try:
        with ThreadPoolExecutor(10) as executor:
            results = [future.result(timeout=HANG_GUARD) for future in [executor.submit(get) for _ in range(10)]]
        assert all(isinstance(result, StoreError) for result in results), results
        assert proxy.accepted == 1  # not ten attempts, one after the other
        proxy.frozen = False
        assert guarded(lambda: store.get("k")) is None  # a new attempt, which succeeds
    finally:
        store.close()
        proxy.close()


def test_close_is_idempotent_and_final(postgres_url: str, table: str) -> None:
    unused = SyncPostgresStore(postgres_url, table=table)
    unused.close()
    unused.close()
    store = SyncPostgresStore(postgres_url, table=table)
    assert store.get("k") is None
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("k")


def test_purge_expired(store: SyncPostgresStore) -> None:
    token = token_of(store.claim("gone", "fp", lease=0.05, ttl=0.05))
    assert token
    assert isinstance(store.claim("kept", "fp", lease=60, ttl=60), Acquired)
    time.sleep(0.2)
    assert store.purge_expired() == 1
    assert store.get("kept") is not None


def test_is_a_sync_store(store: SyncPostgresStore) -> None:
    assert isinstance(store, SyncStore)
