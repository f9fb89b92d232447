"""In-process ASGI benchmark: a trivial FastAPI endpoint, bare and wrapped in ``IdempotencyMiddleware``, per store.

Run it with ``make bench`` (or ``.venv/bin/python benchmarks/bench.py``); ``--quick`` is a smoke run, ``--json PATH``
writes the results, ``--stores memory,sqlite,redis,postgres`` picks the stores (all four by default).

Theory of operation: the ASGI application is called directly, with a scope built the way uvicorn builds one, a
``receive`` that hands over the body once and a ``send`` that discards, on one asyncio event loop. No HTTP client
and no web server are involved, so what is measured is the application and the middleware (and, for the network
stores, the store's client library and its round trips to the store's server), nothing else. Cases:

``no-key``
    a POST without an ``Idempotency-Key``: the middleware only looks at the headers and passes it through.
``fresh-key``
    a POST with a new key every time: claim, run the app, record and complete.
``replay``
    the same key again and again: one claim finds the completed record and the stored response is sent; the app
    is not called.

Each case is timed in repetitions of N requests per side (N calibrated per case, see ``Settings``). In a repetition
the bare and the wrapped app take turns in blocks of requests, after one ``gc.collect()``, so that drift and noise of
the machine affect both alike; which side starts alternates between repetitions. Every request is followed by one
turn of the event loop, as in a server. The table shows the medians over the repetitions of µs per request, and the
median of the repetitions' ratios wrapped/bare.

Store round trips are counted in a separate, untimed pass through a counting proxy of the store, so that the proxy's
own cost never shows in the timings. That pass also checks each case answers what it should (200, and
``Idempotent-Replayed: true`` on a replay), so a benchmark of the wrong path (a 409, a 422) cannot go unnoticed.

Network stores. ``redis`` and ``postgres`` run against the servers at ``--redis-url`` and ``--postgres-url``
(by default ``IDEMPO_TEST_REDIS_URL`` and ``IDEMPO_TEST_POSTGRES_URL``, else the local servers ``make services``
starts). A server that does not answer is skipped with a note; under ``CI=true`` or with ``--require-services`` that
is an error instead. A run keeps its records under names of its own, a key prefix ``idempo-bench-<random>:`` and a
table ``idempo_bench_<random>``, so a shared server is safe; records are kept ``TTL`` seconds, and at the end the run
deletes its keys (``SCAN`` + ``UNLINK`` of its prefix, never a ``FLUSH``) and drops its table.

Where the time goes. In every repetition, after the cases, the store calls of each case are also timed alone,
straight on the store, without the middleware (fresh key: a claim and a complete of the payload the middleware
stored; replay: a claim of the replay key, which finds its completed record), and so is one bare operation of each
server, through the same client library as the store but on a connection of the bench's own (``PING`` for Redis,
``EXISTS`` of one key on a cluster, a prepared ``SELECT 1`` for PostgreSQL): blocks of calls, the mean per call,
the median over the repetitions, as for the requests. A second table splits a wrapped request into the app (the bare
app's time; it does not run on a replay), the store calls (of which: round trips x the server's bare operation, the
rest being the client library and the store's own code) and the remainder: the middleware itself, plus whatever
the app and the store calls cost more inside a request than alone. That part is not small on a network store: the
process sleeps in every round trip, and the server runs meanwhile, on the same machine, so the code that runs next
finds its caches cold; and a PostgreSQL write waits for its commit to reach the disk, whose time varies.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import FastAPI

import idempo
from idempo import IdempotencyMiddleware, MemoryStore, SQLiteStore, Store, store_from_url
from idempo.asgi import ASGIApp, Message, Receive, Scope
from idempo.stores import parse_store_url, redact

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from redis.asyncio import Redis, RedisCluster

CASES: Final = ("no-key", "fresh-key", "replay", "replay-cached")
CACHE_SIZE: Final = 1000  # the replay-cached case: the middleware keeps completed responses in this process
STORES: Final = ("memory", "sqlite", "redis", "postgres")
NETWORK_STORES: Final = ("redis", "postgres")
STORE_METHODS: Final = ("claim", "complete", "release", "renew", "get", "delete", "purge_expired")
# The targets of the issue, as the most a wrapped request may cost relative to the bare app. Report only.
TARGETS: Final[dict[tuple[str, str], float]] = {
    ("no-key", "memory"): 1.05,
    ("no-key", "sqlite"): 1.05,
    ("fresh-key", "memory"): 1.3,
    ("fresh-key", "sqlite"): 5.0,
    ("replay", "memory"): 0.3,
    ("fresh-key", "redis"): 4.0,
    ("replay", "redis"): 2.0,
    ("fresh-key", "postgres"): 8.0,
}

BODY: Final = b'{"item":"widget","quantity":3,"note":"leave at the door"}'
PATH: Final = "/orders"
CHECK_REQUESTS: Final = 20
# The middleware's ttl and lease, on every store. A short ttl: a network store's records go away on their own too.
TTL: Final = 600.0
LEASE: Final = 30.0

IN_CI: Final = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DEFAULT_URLS: Final = {
    "redis": os.environ.get("IDEMPO_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
    "postgres": os.environ.get("IDEMPO_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/test",
}
CONNECT_TIMEOUT: Final = 5.0  # seconds the bench's own check of a server may take


@dataclass(frozen=True)
class Settings:
    """How much to run.

    Each case gets *reps* repetitions of N requests per side. N is *n* if given; otherwise it is chosen per case
    from a timed calibration block so that one repetition (both sides) takes about *budget_ms*, between two blocks
    and *max_n*: a SQLite fresh key costs ten times a replay, and a PostgreSQL one ten times more, and this keeps
    them all well sampled and the whole run near a minute. *warmup* requests per side go first; requests are timed
    in blocks of *block*. The store calls and server operations timed alone get a third of *budget_ms* each.
    """

    reps: int
    warmup: int
    block: int
    n: int | None = None
    budget_ms: float = 300.0
    max_n: int = 3000


FULL: Final = Settings(reps=11, warmup=300, block=100)
QUICK: Final = Settings(reps=3, warmup=20, block=20, n=40)


# -- the application --------------------------------------------------------------------------------------------


def make_app() -> FastAPI:
    """A trivial endpoint: a POST that answers a small JSON document without reading the body."""
    app = FastAPI()

    @app.post(PATH)
    async def create_order() -> dict[str, Any]:
        return {"id": 42, "status": "created"}

    return app


# -- requests ---------------------------------------------------------------------------------------------------

_BASE_HEADERS: Final[list[tuple[bytes, bytes]]] = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"python-httpx/0.28.1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJl"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode("ascii")),
]


def make_scope(key: str | None) -> Scope:
    """A fresh scope as uvicorn builds it for ``POST /orders`` (apps and middleware write into the scope, so
    every request gets its own)."""
    headers = list(_BASE_HEADERS)
    if key is not None:
        headers.append((b"idempotency-key", key.encode("ascii")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode("ascii"),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


def receive_once(body: bytes) -> Receive:
    """A ``receive`` that hands over *body* in one message, then reports a disconnect."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def discard(message: Message) -> None:
    """A ``send`` that drops every message."""


Request = tuple[Scope, Receive]


class KeyFactory:
    """Keys that are never used twice in one run, plus one fixed key per store for the replay case."""

    def __init__(self) -> None:
        self._next = 0

    def fresh(self) -> str:
        self._next += 1
        return f"bench-{self._next:08d}"

    @staticmethod
    def replay(store: str) -> str:
        return f"bench-replay-{store}"


def make_requests(case: str, store: str, count: int, keys: KeyFactory) -> list[Request]:
    """*count* requests of *case*, built ahead so that building them is never timed."""
    requests: list[Request] = []
    for _ in range(count):
        if case == "no-key":
            key = None
        elif case == "fresh-key":
            key = keys.fresh()
        else:
            key = keys.replay(store)
        requests.append((make_scope(key), receive_once(BODY)))
    return requests


# -- a counting store -------------------------------------------------------------------------------------------


class CountingStore:
    """A :class:`~idempo.Store` that forwards to another and counts the calls of each method. It also keeps the
    last claim's key and fingerprint and the last payload completed, to make the same calls without the middleware."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: dict[str, int] = dict.fromkeys(STORE_METHODS, 0)
        self.last_claim: tuple[str, str] | None = None
        self.last_payload: bytes | None = None

    def reset(self) -> None:
        self.calls = dict.fromkeys(STORE_METHODS, 0)

    async def claim(
        self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None
    ) -> idempo.Claim:
        self.calls["claim"] += 1
        self.last_claim = key, fingerprint
        return await self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self.calls["renew"] += 1
        return await self.inner.renew(key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self.calls["complete"] += 1
        self.last_payload = payload
        return await self.inner.complete(key, token, payload, ttl=ttl)

    async def release(self, key: str, token: str) -> bool:
        self.calls["release"] += 1
        return await self.inner.release(key, token)

    async def get(self, key: str) -> idempo.Record | None:
        self.calls["get"] += 1
        return await self.inner.get(key)

    async def delete(self, key: str) -> bool:
        self.calls["delete"] += 1
        return await self.inner.delete(key)

    async def purge_expired(self) -> int:
        self.calls["purge_expired"] += 1
        return await self.inner.purge_expired()

    async def close(self) -> None:
        await self.inner.close()


# -- network servers --------------------------------------------------------------------------------------------


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

    def __init__(self, url: str) -> None:
        self.url = url
        self.display = redact(url)
        self.tag = secrets.token_hex(6)
        self.client = "?"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the bench's own connection and check the server answers; raises :class:`Unavailable`."""

    @abc.abstractmethod
    def open_store(self) -> Store:
        """The store, as a user opens it (``store_from_url``), under the run's own names."""

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

    def __init__(self, url: str) -> None:
        super().__init__(url)
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
    name = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.table = f"idempo_bench_{self.tag}"
        self.op = "SELECT 1"
        self._conn: AsyncConnection[Any] | None = None

    async def connect(self) -> None:
        try:
            import psycopg
            import psycopg_pool  # noqa: F401  (the store needs it too)
        except ModuleNotFoundError as exc:
            raise Unavailable("psycopg or psycopg_pool is not installed (pip install 'idempo[postgres]')") from exc
        self.client = f"psycopg {psycopg.__version__}"
        from idempo.stores.postgres import _strip_options

        conninfo = _strip_options(parse_store_url(self.url))  # the libpq URL the store itself connects to
        try:
            self._conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=3), CONNECT_TIMEOUT
            )
            await self.bare_op()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self.aclose()
            raise Unavailable(f"not reachable at {self.display}: {describe(exc)}") from exc

    def open_store(self) -> Store:
        return store_from_url(self.url, table=self.table)

    async def bare_op(self) -> None:
        """Prepared and in binary, as the store sends its statements."""
        assert self._conn is not None
        cursor = await self._conn.execute(b"SELECT 1", prepare=True, binary=True)
        await cursor.fetchone()

    async def cleanup(self) -> str:
        from psycopg import sql

        assert self._conn is not None
        table = sql.Identifier(self.table)
        exists = await (await self._conn.execute("SELECT to_regclass(%s) IS NOT NULL", [self.table])).fetchone()
        if not exists or not exists[0]:
            return f"table {self.table} never made"
        rows = await (await self._conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table))).fetchone()
        await self._conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        return f"table {self.table} ({rows[0] if rows else '?'} rows) dropped at the end"

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def names(self) -> dict[str, str]:
        return {"table": self.table}


SERVERS: Final[dict[str, type[Server]]] = {"redis": RedisServer, "postgres": PostgresServer}


# -- measuring --------------------------------------------------------------------------------------------------


async def time_block(app: ASGIApp, requests: Sequence[Request]) -> int:
    """Run *requests* one after the other, with one turn of the event loop after each, as a server has (it is
    also when the loop drops cancelled timers); return the nanoseconds it took."""
    start = time.perf_counter_ns()
    for scope, receive in requests:
        await app(scope, receive, discard)
        await asyncio.sleep(0)
    return time.perf_counter_ns() - start


def blocks(requests: list[Request], size: int) -> list[list[Request]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


async def time_pair(
    bare: ASGIApp,
    wrapped: ASGIApp,
    case: str,
    store: str,
    n: int,
    block: int,
    keys: KeyFactory,
    *,
    bare_first: bool = True,
) -> tuple[float, float]:
    """One repetition: *n* requests through each app, in blocks that strictly alternate between the two, so that
    both see the same noise and every block follows one of the other side (a block right after one of its own
    side runs warmer). One short untimed block of each goes first, after the ``gc.collect()``, so that neither
    pays for the cold start alone. Returns µs per request, bare and wrapped."""
    settle = min(block, 10)
    bare_blocks = blocks(make_requests(case, store, n, keys), block)
    wrapped_blocks = blocks(make_requests(case, store, n, keys), block)
    settling = [make_requests(case, store, settle, keys) for _ in range(2)]
    sides = [(bare, bare_blocks, settling[0]), (wrapped, wrapped_blocks, settling[1])]
    if not bare_first:
        sides.reverse()
    (first, first_blocks, first_settle), (second, second_blocks, second_settle) = sides
    first_ns = second_ns = 0
    gc.collect()
    await time_block(first, first_settle)
    await time_block(second, second_settle)
    for first_requests, second_requests in zip(first_blocks, second_blocks, strict=True):
        first_ns += await time_block(first, first_requests)
        second_ns += await time_block(second, second_requests)
    bare_ns, wrapped_ns = (first_ns, second_ns) if bare_first else (second_ns, first_ns)
    return bare_ns / n / 1000, wrapped_ns / n / 1000


Operation = Callable[[], Awaitable[None]]


async def time_ops(operation: Operation, count: int) -> float:
    """µs per call of *operation*, over *count* calls one after the other (no loop turn in between: a request's
    loop turn is in both the bare and the wrapped time, and so cancels out of the split)."""
    start = time.perf_counter_ns()
    for _ in range(count):
        await operation()
    return (time.perf_counter_ns() - start) / count / 1000


@dataclass
class Probe:
    """Something timed alone in every repetition: the store calls of a case, or a server's bare operation."""

    label: str
    operation: Operation
    n: int = 0
    samples_us: list[float] = field(default_factory=list)

    async def calibrate(self, settings: Settings) -> None:
        """Warm up; then N such that one block takes about a third of ``settings.budget_ms``."""
        await time_ops(self.operation, settings.block)
        if settings.n is not None:
            self.n = settings.n
            return
        us = await time_ops(self.operation, settings.block)
        n = int(settings.budget_ms * 1000 / 3 / us) // settings.block * settings.block
        self.n = max(settings.block, min(settings.max_n, n))

    async def sample(self) -> None:
        self.samples_us.append(await time_ops(self.operation, self.n))

    @property
    def us(self) -> float:
        return statistics.median(self.samples_us)


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


@dataclass
class ServerResult:
    """A server's bare operation, as measured in the run."""

    store: str
    url: str
    op: str
    client: str
    names: dict[str, str]
    n: int = 0
    us_per_op: float = 0.0
    samples_us: list[float] = field(default_factory=list)
    cleanup: str = ""


@dataclass
class CaseResult:
    """What one case on one store measured."""

    case: str
    store: str
    n: int = 0
    us_per_request: float = 0.0
    bare_us_per_request: float = 0.0
    ratio: float = 0.0
    target: float | None = None
    verdict: str = "-"
    round_trips: dict[str, float] = field(default_factory=dict)
    samples_us: list[float] = field(default_factory=list)
    bare_samples_us: list[float] = field(default_factory=list)
    # The split of a wrapped request (see the module's docstring); µs per request.
    store_calls_us: float = 0.0
    store_calls_samples_us: list[float] = field(default_factory=list)
    server_ops_us: float | None = None
    remainder_us: float = 0.0

    def summarize(self, server: ServerResult | None) -> None:
        """Medians; the ratio is the median of the repetitions' ratios (each one of a bare and a wrapped run
        that saw the same noise), which is steadier than a ratio of medians on a busy machine."""
        self.us_per_request = statistics.median(self.samples_us)
        self.bare_us_per_request = statistics.median(self.bare_samples_us)
        self.ratio = statistics.median(w / b for w, b in zip(self.samples_us, self.bare_samples_us, strict=True))
        self.target = TARGETS.get((self.case, self.store))
        if self.target is not None:
            self.verdict = "PASS" if self.ratio <= self.target else "MISS"
        if self.store_calls_samples_us:
            self.store_calls_us = statistics.median(self.store_calls_samples_us)
        if server is not None:
            self.server_ops_us = sum(self.round_trips.values()) * server.us_per_op
        self.remainder_us = self.us_per_request - self.app_us - self.store_calls_us

    @property
    def app_us(self) -> float:
        """The app's share of a wrapped request: the bare request's time, or nothing on a replay."""
        return 0.0 if self.case.startswith("replay") else self.bare_us_per_request


class Recorder:
    """A ``send`` that keeps the messages of one response, for the checks."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        start = self.messages[0]
        body = b"".join(m.get("body", b"") for m in self.messages[1:])
        return start["status"], dict(start["headers"]), body


async def call(app: ASGIApp, request: Request) -> tuple[int, dict[bytes, bytes], bytes]:
    recorder = Recorder()
    scope, receive = request
    await app(scope, receive, recorder)
    return recorder.response()


def wrap(app: ASGIApp, store: Store, case: str = "") -> IdempotencyMiddleware:
    cache_size = CACHE_SIZE if case == "replay-cached" else 0
    return IdempotencyMiddleware(app, store=store, ttl=TTL, lease=LEASE, cache_size=cache_size)


async def count_round_trips(
    app: FastAPI, store: Store, store_name: str, case: str, keys: KeyFactory
) -> tuple[dict[str, float], CountingStore]:
    """Store calls per request of *case*, through a counting proxy; also check what the case answers. Returns
    the proxy too, with the last calls it saw."""
    counting = CountingStore(store)
    wrapped = wrap(app, counting, case)
    requests = make_requests(case, store_name, CHECK_REQUESTS, keys)
    _, _, expected_body = await call(app, make_requests("no-key", store_name, 1, keys)[0])
    if case == "replay-cached":  # what the cache is for: the replays after the first one this process sees
        await call(wrapped, make_requests(case, store_name, 1, keys)[0])
        counting.reset()
    for request in requests:
        status, headers, body = await call(wrapped, request)
        replayed = headers.get(b"idempotent-replayed") == b"true"
        if status != 200 or body != expected_body or replayed != case.startswith("replay"):
            msg = (
                f"{case} on {store_name}: answered {status} {headers!r} {body!r}; the benchmark measures the wrong path"
            )
            raise RuntimeError(msg)
    return {method: count / CHECK_REQUESTS for method, count in counting.calls.items()}, counting


async def bench_store(
    store_name: str,
    store: Store,
    settings: Settings,
    keys: KeyFactory,
    log: Callable[[str], None],
    server: Server | None = None,
) -> tuple[list[CaseResult], ServerResult | None]:
    app = make_app()
    wrapped = wrap(app, store)
    # The replay case needs its response stored first.
    status, _, _ = await call(wrapped, make_requests("replay", store_name, 1, keys)[0])
    if status != 200:
        msg = f"seeding the replay key on {store_name} answered {status}"
        raise RuntimeError(msg)
    results = {case: CaseResult(case, store_name) for case in CASES}
    wrapped_for = {case: wrapped if case != "replay-cached" else wrap(app, store, case) for case in CASES}
    seen: dict[str, CountingStore] = {}
    for case in CASES:
        result = results[case]
        result.round_trips, seen[case] = await count_round_trips(app, store, store_name, case, keys)
        await time_pair(app, wrapped_for[case], case, store_name, settings.warmup, settings.block, keys)
        result.n = settings.n or await calibrate(app, wrapped_for[case], case, store_name, settings, keys)
    fresh, replay = seen["fresh-key"], seen["replay"]
    if fresh.last_claim is None or fresh.last_payload is None or replay.last_claim is None:
        msg = f"the middleware made no claim or no complete on {store_name}"
        raise RuntimeError(msg)
    calls = StoreCalls(store, fresh.last_claim[1], fresh.last_payload, replay.last_claim)
    probes = {"fresh-key": Probe("fresh-key", calls.fresh_key), "replay": Probe("replay", calls.replay)}
    server_probe = None if server is None else Probe(server.op, server.bare_op)
    every_probe = [*probes.values(), *([server_probe] if server_probe else [])]
    for probe in every_probe:
        await probe.calibrate(settings)
    log(
        f"  {store_name}: N per case: "
        + ", ".join(f"{r.case} {r.n}" for r in results.values())
        + "; calls timed alone: "
        + ", ".join(f"{p.label} {p.n}" for p in every_probe)
    )
    for rep in range(settings.reps):
        for result in results.values():
            bare_us, wrapped_us = await time_pair(
                app,
                wrapped_for[result.case],
                result.case,
                store_name,
                result.n,
                settings.block,
                keys,
                bare_first=rep % 2 == 0,
            )
            result.bare_samples_us.append(bare_us)
            result.samples_us.append(wrapped_us)
        gc.collect()
        for probe in every_probe:
            await probe.sample()
        log(f"  {store_name}: repetition {rep + 1}/{settings.reps} done")
    server_result = None
    if server is not None and server_probe is not None:
        server_result = ServerResult(
            store_name, server.display, server.op, server.client, server.names(), server_probe.n, server_probe.us
        )
        server_result.samples_us = server_probe.samples_us
    for result in results.values():
        case_probe = probes.get(result.case)
        if case_probe is not None:
            result.store_calls_samples_us = case_probe.samples_us
        result.summarize(server_result)
    return list(results.values()), server_result


async def calibrate(
    bare: ASGIApp, wrapped: ASGIApp, case: str, store: str, settings: Settings, keys: KeyFactory
) -> int:
    """N such that a repetition of *case* (N requests per side) takes about ``settings.budget_ms``."""
    bare_us, wrapped_us = await time_pair(bare, wrapped, case, store, settings.block, settings.block, keys)
    n = int(settings.budget_ms * 1000 / (bare_us + wrapped_us)) // settings.block * settings.block
    return max(2 * settings.block, min(settings.max_n, n))


@dataclass
class Outcome:
    """Everything a run measured, and the stores it had to skip (with why)."""

    results: list[CaseResult] = field(default_factory=list)
    servers: list[ServerResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def unavailable_note(name: str, reason: str) -> str:
    option = f"--{name}-url"
    variable = f"IDEMPO_TEST_{name.upper()}_URL"
    return (
        f"{name} skipped ({reason}). Start it with 'make services', or point {option} or {variable} at one "
        "(under CI=true or with --require-services this is an error)"
    )


async def run(
    store_names: Sequence[str],
    settings: Settings,
    log: Callable[[str], None],
    urls: Mapping[str, str] | None = None,
    *,
    require_services: bool = False,
) -> Outcome:
    """Benchmark each store in turn. Raises :class:`Unavailable` if a server does not answer and
    *require_services*; otherwise that store is skipped."""
    urls = {**DEFAULT_URLS, **(urls or {})}
    keys = KeyFactory()
    outcome = Outcome()
    servers: dict[str, Server] = {}
    try:
        for name in store_names:
            if name not in SERVERS:
                continue
            server = SERVERS[name](urls[name])
            try:
                await server.connect()
            except Unavailable as exc:
                if require_services:
                    raise Unavailable(f"{name}: {exc}") from exc
                outcome.skipped[name] = str(exc)
                log(f"  {unavailable_note(name, str(exc))}")
                continue
            servers[name] = server
        with tempfile.TemporaryDirectory(prefix="idempo-bench-") as tmp:
            for name in store_names:
                if name in outcome.skipped:
                    continue
                results, server_result = await bench_one(name, servers.get(name), Path(tmp), settings, keys, log)
                outcome.results.extend(results)
                if server_result is not None:
                    outcome.servers.append(server_result)
    finally:
        for server in servers.values():
            await server.aclose()
    return outcome


async def bench_one(
    name: str, server: Server | None, tmp: Path, settings: Settings, keys: KeyFactory, log: Callable[[str], None]
) -> tuple[list[CaseResult], ServerResult | None]:
    """One store, opened, benchmarked, closed, and what it left on its server removed."""
    if server is not None:
        store = server.open_store()
    else:
        store = MemoryStore() if name == "memory" else SQLiteStore(tmp / "bench.db")
    try:
        results, server_result = await bench_store(name, store, settings, keys, log, server)
    finally:
        try:
            await store.close()
        finally:
            cleaned = await server.cleanup() if server is not None else ""
    if server_result is not None:
        server_result.cleanup = cleaned
        log(f"  {name}: {cleaned}")
    return results, server_result


# -- reporting --------------------------------------------------------------------------------------------------


def format_table(results: Sequence[CaseResult]) -> str:
    def trips(result: CaseResult) -> str:
        shown = [f"{method}={count:g}" for method, count in result.round_trips.items() if count]
        return " ".join(shown) or "none"

    header = (
        f"{'case':<13} {'store':<8} {'N':>5} {'µs/req':>8} {'bare µs':>8} {'ratio':>6} {'target':>7} {'':<5} "
        "store calls/req"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        target = f"≤{r.target:g}x" if r.target is not None else "-"
        lines.append(
            f"{r.case:<13} {r.store:<8} {r.n:>5} {r.us_per_request:>8.1f} {r.bare_us_per_request:>8.1f} "
            f"{r.ratio:>5.2f}x {target:>7} {r.verdict:<5} {trips(r)}"
        )
    return "\n".join(lines)


def format_split(results: Sequence[CaseResult], servers: Sequence[ServerResult]) -> str:
    """Where a wrapped request's time goes, and each server's bare operation."""
    header = (
        f"{'case':<13} {'store':<8} {'wrapped':>8} {'app':>8} {'store calls':>12} {'of which server':>16} "
        f"{'remainder':>10}"
    )
    lines = [
        "Where the time goes, µs per wrapped request: the app (the bare app's time; not run on a replay), the store",
        "calls timed alone (of which the server: round trips x its bare operation; the rest of them is the client",
        "library and the store's code), and the remainder: the middleware, plus what the app and the store calls cost",
        "more inside a request than alone (cold caches after each wait for the server; PostgreSQL's commit flushes).",
        header,
        "-" * len(header),
    ]
    by_store = {server.store: server for server in servers}
    for r in results:
        server = by_store.get(r.store)
        if r.server_ops_us is None or server is None or not r.server_ops_us:
            of_server = "-"
        else:
            of_server = f"{sum(r.round_trips.values()):g}x{server.us_per_op:.0f}={r.server_ops_us:.1f}"
        lines.append(
            f"{r.case:<13} {r.store:<8} {r.us_per_request:>8.1f} {r.app_us:>8.1f} {r.store_calls_us:>12.1f} "
            f"{of_server:>16} {r.remainder_us:>10.1f}"
        )
    for server in servers:
        lines.append(
            f"{server.store}: bare {server.op} {server.us_per_op:.1f} µs ({server.client}, a connection of its own to "
            f"{server.url}); {server.cleanup}."
        )
    return "\n".join(lines)


def to_json(outcome: Outcome, settings: Settings, quick: bool, wall_s: float) -> dict[str, Any]:
    return {
        "settings": {
            "n": settings.n,
            "budget_ms": settings.budget_ms,
            "max_n": settings.max_n,
            "reps": settings.reps,
            "warmup": settings.warmup,
            "block": settings.block,
            "quick": quick,
            "ttl": TTL,
            "lease": LEASE,
        },
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "event_loop": "asyncio (default), one loop turn per request",
            "gc": "enabled; gc.collect() before every repetition",
        },
        "wall_seconds": round(wall_s, 2),
        "skipped": outcome.skipped,
        "servers": {
            s.store: {
                "url": s.url,
                "client": s.client,
                "op": s.op,
                "n": s.n,
                "us_per_op": s.us_per_op,
                "samples_us": s.samples_us,
                "cleanup": s.cleanup,
                **s.names,
            }
            for s in outcome.servers
        },
        "results": [
            {
                "case": r.case,
                "store": r.store,
                "n": r.n,
                "us_per_request": r.us_per_request,
                "bare_us_per_request": r.bare_us_per_request,
                "ratio": r.ratio,
                "ratios": [w / b for w, b in zip(r.samples_us, r.bare_samples_us, strict=True)],
                "target": r.target,
                "verdict": r.verdict,
                "round_trips": r.round_trips,
                "samples_us": r.samples_us,
                "bare_samples_us": r.bare_samples_us,
                "split_us": {
                    "app": r.app_us,
                    "store_calls": r.store_calls_us,
                    "server_ops": r.server_ops_us,
                    "remainder": r.remainder_us,
                },
                "store_calls_samples_us": r.store_calls_samples_us,
            }
            for r in outcome.results
        ],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few iterations only: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument(
        "--stores", default=",".join(STORES), help=f"comma-separated stores to run (default: {','.join(STORES)})"
    )
    parser.add_argument("-n", type=int, help="requests per repetition (overrides the default or --quick)")
    parser.add_argument("--reps", type=int, help="repetitions per case (overrides the default or --quick)")
    for name in NETWORK_STORES:
        parser.add_argument(
            f"--{name}-url",
            default=DEFAULT_URLS[name],
            metavar="URL",
            help=f"the {name} store's URL (default: $IDEMPO_TEST_{name.upper()}_URL or {DEFAULT_URLS[name]})",
        )
    parser.add_argument(
        "--require-services",
        action="store_true",
        default=IN_CI,
        help="fail, rather than skip, when a server does not answer (the default under CI=true)",
    )
    args = parser.parse_args(argv)
    stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown = [name for name in stores if name not in STORES]
    if unknown or not stores:
        parser.error(f"--stores takes a comma-separated list of {', '.join(STORES)}; got {args.stores!r}")
    args.stores = list(dict.fromkeys(stores))
    if (args.n is not None and args.n < 1) or (args.reps is not None and args.reps < 1):
        parser.error("-n and --reps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = dataclasses.replace(base, n=args.n or base.n, reps=args.reps or base.reps)
    sizes = f"{settings.n} requests" if settings.n else f"about {settings.budget_ms:g} ms"

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(
        f"idempo benchmark: {settings.reps} repetitions per case of {sizes} (bare and wrapped); "
        f"stores {', '.join(args.stores)}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    urls = {"redis": args.redis_url, "postgres": args.postgres_url}
    started = time.perf_counter()
    try:
        outcome = asyncio.run(run(args.stores, settings, log, urls, require_services=args.require_services))
    except Unavailable as exc:
        why = "CI=true" if IN_CI else "--require-services"
        print(f"error: {exc} ({why}: a server that does not answer is an error, not a skip)", file=sys.stderr)
        return 2
    wall = time.perf_counter() - started
    if outcome.results:
        print(format_table(outcome.results))
        print(
            f"\nµs/req: median of {settings.reps} repetitions of N requests per side, bare and wrapped alternating in "
            f"blocks of {settings.block}.\nratio: median of the repetitions' wrapped/bare. Targets are reported, "
            f"never enforced. {wall:.1f} s in all.\n"
        )
        print(format_split(outcome.results, outcome.servers))
    for name, reason in outcome.skipped.items():
        print(f"note: {unavailable_note(name, reason)}.")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(outcome, settings, args.quick, wall), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
