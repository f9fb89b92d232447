"""The stores under test and their servers (see ``bench.py``'s docstring): a counting proxy of a store, the Redis
and PostgreSQL servers a run keeps its records on (under names of its own, removed at the end) with one bare
operation each, and the store calls of a case made straight on the store, to be timed alone."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from _apps import LEASE, TTL
from floor import Backend, Found, MemoryBackend, PostgresBackend, RedisBackend, SQLiteBackend

import idempo
from idempo import Claim, MemoryStore, SQLiteStore, Store, store_from_url
from idempo.stores import parse_store_url, redact
from idempo.stores._forwarding import ForwardingStore, Operation

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

NETWORK_STORES: Final = ("redis", "postgres")
STORE_METHODS: Final = ("claim", "complete", "release", "renew", "get", "delete", "purge_expired")
DEFAULT_URLS: Final = {
    "redis": os.environ.get("IDEMPO_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
    "postgres": os.environ.get("IDEMPO_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/test",
}
CONNECT_TIMEOUT: Final = 5.0  # seconds the bench's own check of a server may take


# -- a counting store -------------------------------------------------------------------------------------------


class CountingStore(ForwardingStore):
    """A :class:`~idempo.Store` that forwards to another and counts the calls of each method. It also keeps the
    last claim's key and fingerprint and the last payload completed, to make the same calls without the middleware."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.calls: dict[str, int] = dict.fromkeys(STORE_METHODS, 0)
        self.last_claim: tuple[str, str] | None = None
        self.last_payload: bytes | None = None

    def reset(self) -> None:
        self.calls = dict.fromkeys(STORE_METHODS, 0)

    async def _forward(self, operation: Operation, /, *args: Any, **kwargs: Any) -> Any:
        if operation in self.calls:  # close is not a store call of a request
            self.calls[operation] += 1
        return await super()._forward(operation, *args, **kwargs)

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self.last_claim = key, fingerprint
        return await super().claim(key, fingerprint, lease=lease, ttl=ttl, token=token)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self.last_payload = payload
        return await super().complete(key, token, payload, ttl=ttl)


class CountingBackend:
    """A floor :class:`~floor.Backend` that forwards to another and counts its calls (each one round trip)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {"claim": 0, "record": 0}

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)

    async def claim(self, key: str, fingerprint: bytes) -> Found | None:
        self.calls["claim"] += 1
        return await self.inner.claim(key, fingerprint)

    async def record(self, key: str, fingerprint: bytes, response: bytes) -> None:
        self.calls["record"] += 1
        await self.inner.record(key, fingerprint, response)

    async def aclose(self) -> None:
        """Nothing: the inner backend is the bench's, closed by it."""


# -- network servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (for a server a benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Unavailable(Exception):
    """A network store's server does not answer, or its client library is not installed."""


def describe(exc: BaseException) -> str:
    """*exc* on one line, without a final full stop (libpq's messages run over several lines)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(".")


class Server(abc.ABC):
    """The server of a network store, for one run: the store on it, under names of the run's own; one bare
    operation through the same client library as the store, on a connection of the bench's own; the clean-up."""

    name: ClassVar[str]
    op: str

    def __init__(self, url: str, tag: str | None = None) -> None:
        self.url = url
        self.display = redact(url)
        self.tag = tag or secrets.token_hex(6)  # in the names of the run's records (given: another process's run)
        self.client = "?"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the bench's own connection and check the server answers; raises :class:`Unavailable`."""

    @abc.abstractmethod
    def open_store(self) -> Store:
        """The store, as a user opens it (``store_from_url``), under the run's own names."""

    @abc.abstractmethod
    def floor_backend(self) -> Backend:
        """The floor's backend on this server (``floor.py``), under the run's own names."""

    def floor_client(self) -> str:
        """The floor's client library, for the report."""
        return "?"

    @abc.abstractmethod
    async def bare_op(self) -> None:
        """One round trip to the server that does (next to) nothing there."""

    @abc.abstractmethod
    async def cleanup(self) -> str:
        """Remove what the run left on the server; says what."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the bench's own connection."""

    @abc.abstractmethod
    def names(self) -> dict[str, str]:
        """Where the run keeps its records, for the JSON output (and the test that checks they are gone)."""


_REDIS_STORE_OPTIONS: Final = frozenset({"prefix", "timeout", "connect_timeout"})


class RedisServer(Server):
    name = "redis"

    def __init__(self, url: str, tag: str | None = None) -> None:
        super().__init__(url, tag)
        self.prefix = f"idempo-bench-{self.tag}:"
        self.cluster = urlsplit(url).scheme.lower() == "redis+cluster"
        # PING goes to every node of a cluster: there, the bare operation is one on a key, as the store's are.
        self.op = "EXISTS" if self.cluster else "PING"
        self._client: Redis | RedisCluster | None = None

    def _make_client(self) -> Redis | RedisCluster:
        from redis.asyncio import Redis, RedisCluster

        parts = urlsplit(self.url)
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _REDIS_STORE_OPTIONS])
        options: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, "decode_responses": False}
        if self.cluster:
            # The first node of the list; the client finds the others.
            credentials, at, hosts = parts.netloc.rpartition("@")
            first = hosts.split(",")[0]
            return RedisCluster.from_url(urlunsplit(("redis", credentials + at + first, "", query, "")), **options)
        return Redis.from_url(urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")), **options)

    async def connect(self) -> None:
        try:
            import redis
        except ModuleNotFoundError as exc:
            raise Unavailable("redis-py is not installed (pip install 'idempo[redis]')") from exc
        from redis.exceptions import RedisClusterException, RedisError

        self.client = f"redis-py {redis.__version__}"
        try:
            client = self._make_client()
        except (ValueError, RedisError, RedisClusterException) as exc:
            raise Unavailable(f"cannot make a client for {self.display}: {describe(exc)}") from exc
        self._client = client
        try:
            await asyncio.wait_for(self.bare_op(), CONNECT_TIMEOUT)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            await self.aclose()
            raise Unavailable(f"not reachable at {self.display}: {describe(exc)}") from exc

    def open_store(self) -> Store:
        return store_from_url(self.url, prefix=self.prefix)

    def floor_backend(self) -> Backend:
        """Under the run's prefix (removed at the end with the store's keys), records kept ``TTL`` seconds too."""
        if self.cluster:
            raise Unavailable("the floor has no Redis Cluster backend")
        parts = urlsplit(self.url)
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _REDIS_STORE_OPTIONS])
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        return RedisBackend(url, prefix=f"{self.prefix}floor:", ttl=int(TTL))

    def floor_client(self) -> str:
        from redis.utils import HIREDIS_AVAILABLE

        return f"{self.client}{' + hiredis' if HIREDIS_AVAILABLE else ''}, Lua EVALSHA"

    async def bare_op(self) -> None:
        assert self._client is not None
        if self.cluster:
            await self._client.exists(self.prefix + "bare-op")
        else:
            await self._client.ping()

    async def cleanup(self) -> str:
        """``UNLINK`` the keys under the run's prefix, found with ``SCAN`` (never a ``FLUSH``: the server is shared)."""
        client = self._client
        assert client is not None
        removed = 0
        batch: list[bytes] = []
        async for key in client.scan_iter(match=self.prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += await client.unlink(*batch)
                batch.clear()
        if batch:
            removed += await client.unlink(*batch)
        return f"{removed} keys under {self.prefix!r} unlinked at the end"

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def names(self) -> dict[str, str]:
        return {"prefix": self.prefix}


class PostgresServer(Server):
    """The bench's own connection is asyncpg's, the store's client (``PostgresStore``; the floor's too)."""

    name = "postgres"

    def __init__(self, url: str, tag: str | None = None) -> None:
        super().__init__(url, tag)
        self.table = f"idempo_bench_{self.tag}"
        self.floor_table = f"{self.table}_floor"
        self.op = "SELECT 1"
        self._conn: Any = None  # an asyncpg.Connection
        self._select_one: Any = None  # its prepared SELECT 1

    def _conninfo(self) -> str:
        from idempo.stores.postgres import _strip_options

        return _strip_options(parse_store_url(self.url))  # the libpq URL the store itself connects to

    async def connect(self) -> None:
        try:
            import asyncpg  # type: ignore[import-untyped]
        except ModuleNotFoundError as exc:
            raise Unavailable("asyncpg is not installed (pip install 'idempo[postgres]')") from exc
        self.client = f"asyncpg {asyncpg.__version__}"
        try:
            self._conn = await asyncio.wait_for(asyncpg.connect(self._conninfo(), timeout=3), CONNECT_TIMEOUT)
            self._select_one = await self._conn.prepare("SELECT 1")
            await self.bare_op()
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            await self.aclose()
            raise Unavailable(f"not reachable at {self.display}: {describe(exc)}") from exc

    def open_store(self) -> Store:
        return store_from_url(self.url, table=self.table)

    def floor_backend(self) -> Backend:
        """asyncpg on the libpq URL the store connects to, in a table of the run's own (dropped at the end)."""
        return PostgresBackend(self._conninfo(), table=self.floor_table)

    def floor_client(self) -> str:
        import asyncpg

        return f"asyncpg {asyncpg.__version__}, prepared statements"

    async def bare_op(self) -> None:
        """A prepared statement, as the store sends its own."""
        await self._select_one.fetchval()

    async def cleanup(self) -> str:
        conn = self._conn
        assert conn is not None
        said = []
        for name in (self.table, self.floor_table):
            if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                said.append(f"table {name} never made")
                continue
            quoted = '"' + name.replace('"', '""') + '"'
            rows = await conn.fetchval(f"SELECT count(*) FROM {quoted}")
            await conn.execute(f"DROP TABLE IF EXISTS {quoted}")
            said.append(f"table {name} ({rows} rows) dropped at the end")
        return ", ".join(said)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def names(self) -> dict[str, str]:
        return {"table": self.table, "floor_table": self.floor_table}


SERVERS: Final[dict[str, type[Server]]] = {"redis": RedisServer, "postgres": PostgresServer}


def open_store(name: str, server: Server | None, tmp: Path) -> Store:
    """The store *name*: on its server for a network store, else a memory store or an SQLite file in *tmp*."""
    if server is not None:
        return server.open_store()
    return MemoryStore() if name == "memory" else SQLiteStore(tmp / "bench.db")


def open_floor(name: str, server: Server | None, tmp: Path) -> Backend:
    """The floor's backend for *name*: on its server for a network store (:class:`Unavailable` if it has none
    there), else a dict or an SQLite file of its own in *tmp*."""
    if server is not None:
        return server.floor_backend()
    return MemoryBackend() if name == "memory" else SQLiteBackend(str(tmp / "floor.db"))


@dataclass
class Opened:
    """The store of a run and the floor's backend beside it (``None`` if it has none there: *no_floor* says why);
    once closed, what their clean-up of the server said (*cleaned*)."""

    store: Store
    floor: Backend | None = None
    no_floor: str = ""
    cleaned: str = ""


@contextlib.asynccontextmanager
async def opened(name: str, server: Server | None, tmp: Path) -> AsyncIterator[Opened]:
    """:func:`open_store` and :func:`open_floor` of *name*; at the end both closed, and what they left on *server*
    removed, whatever happened."""
    run = Opened(open_store(name, server, tmp))
    try:
        try:
            run.floor = open_floor(name, server, tmp)
        except Unavailable as exc:
            run.no_floor = str(exc)
        yield run
    finally:
        try:
            await run.store.close()
            if run.floor is not None:
                await run.floor.aclose()
        finally:
            run.cleaned = await server.cleanup() if server is not None else ""


def floor_client(name: str, server: Server | None) -> str:
    """The floor's client on *name*, for the report."""
    if server is not None:
        return server.floor_client()
    return "a dict" if name == "memory" else f"sqlite3 (SQLite {sqlite3.sqlite_version}), WAL, synchronous=NORMAL"


# -- the store calls timed alone ----------------------------------------------------------------------------------


class StoreCalls:
    """The store calls the middleware makes for a case, made straight on the store: its share of a request."""

    def __init__(self, store: Store, fresh_fingerprint: str, payload: bytes, replay: tuple[str, str]) -> None:
        self.store = store
        self.fresh_fingerprint = fresh_fingerprint
        self.payload = payload
        self.replay_key, self.replay_fingerprint = replay
        self._next = 0

    async def fresh_key(self) -> None:
        self._next += 1
        key = f"probe-{self._next:08d}"
        claim = await self.store.claim(key, self.fresh_fingerprint, lease=LEASE, ttl=TTL)
        if not isinstance(claim, idempo.Acquired) or not await self.store.complete(
            key, claim.token, self.payload, ttl=TTL
        ):
            msg = f"the store calls of a fresh key did not claim and complete {key!r}: {claim!r}"
            raise RuntimeError(msg)

    async def replay(self) -> None:
        claim = await self.store.claim(self.replay_key, self.replay_fingerprint, lease=LEASE, ttl=TTL)
        if not isinstance(claim, idempo.Existing):
            msg = f"the store calls of a replay did not find the completed record: {claim!r}"
            raise RuntimeError(msg)
