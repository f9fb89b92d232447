"""The floor: the least an Idempotency-Key middleware must do per request, to measure idempo against (issue 17).

**NOT SAFE. A yardstick, never a middleware to use.** It has no lease renewal (a slow handler's key stays claimed,
a crashed one's forever), no fencing (nothing stops a second owner's record), no outage handling (a store error is
the request's error, and leaves the key claimed), no principal scoping (any caller replays anyone's response), no
limits (body size, key length, record count, TTL on SQL stores: none), no expiry of in-progress claims, and on
PostgreSQL a claim racing an uncommitted claim of the same key may take itself for the winner. What it does, per
keyed request (``Idempotency-Key`` present, any method):

1. read the body, and hash it: SHA-256 over method, path and body;
2. ONE store round trip: claim the key, or read what holds it;
3. a new key: run the app, passing its messages through as they come and keeping them; ONE round trip to record
   the response (status, headers, body, ``marshal``-ed) before its last message goes to the client (as idempo
   does, so that a retry sent the moment the response arrives is replayed). A key held by another fingerprint:
   422; one still in progress: 409; a completed one: its response, with ``Idempotent-Replayed: true`` (a replay is
   ONE round trip).

A request without the header goes straight to the app. One backend per store, each on the fastest well-kept Python
client for it:

``memory``
    a dict of the process (``dict.setdefault``: claim-or-read in one operation).
``sqlite``
    the standard library's ``sqlite3``, in WAL mode with ``synchronous=NORMAL`` (idempo's default durability), one
    connection in autocommit, statements run on the event loop's thread (as idempo's default ``inline`` store does).
    Claim: a read, and only if it found nothing, ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (so a replay is one
    plain read, as idempo's is; inserting first costs a replay ~7 µs more, a write transaction that changes nothing,
    and saves a fresh key ~5 µs, the read of a missing key: measured on the 2-core machine); record: one ``UPDATE``.
``redis``
    redis-py's asyncio client (with hiredis when installed), a Lua script (``EVALSHA``) for claim-or-read (``SET NX``,
    else ``GET``), a plain ``SET`` to record. Records expire after *ttl*.
``postgres``
    asyncpg, prepared statements: claim-or-read is one statement (a CTE ``INSERT ... ON CONFLICT DO NOTHING`` and a
    read of the row that was there), record one ``UPDATE``. One connection, more only when requests overlap (a
    server under load): a free list, as small as the concurrency.

Using it. ``floor_app(app, store, url)`` wraps an ASGI app; it opens its connection lazily, on the first keyed
request of the process that serves it (so it can be built at import time in a uvicorn worker), and ``aclose()``
closes it. ``floor_app_from_env(app)`` reads ``IDEMPO_FLOOR_STORE`` (memory, sqlite, redis, postgres),
``IDEMPO_FLOOR_URL`` (a file path for sqlite, a URL its client takes for redis and postgres) and optionally
``IDEMPO_FLOOR_PREFIX`` (Redis keys) and ``IDEMPO_FLOOR_TABLE`` (SQL table). A server module for uvicorn is two
lines, e.g. ``benchmarks/floor_server.py``::

    from _apps import make_app  # with benchmarks/ on sys.path (uvicorn --app-dir benchmarks)
    from floor import floor_app_from_env
    app = floor_app_from_env(make_app())

then ``IDEMPO_FLOOR_STORE=redis IDEMPO_FLOOR_URL=redis://127.0.0.1:6379/0 uvicorn --app-dir benchmarks
floor_server:app --workers 2``. This module imports nothing from ``benchmarks/``, and its clients only when used.
``FloorMiddleware(app, backend)`` takes a backend of your own (``Backend``: ``claim``, ``record``, ``aclose``);
the benchmark counts round trips that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import marshal
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = [
    "STORES",
    "Backend",
    "FloorMiddleware",
    "Found",
    "MemoryBackend",
    "PostgresBackend",
    "RedisBackend",
    "SQLiteBackend",
    "floor_app",
    "floor_app_from_env",
    "open_backend",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# What a claim finds: the fingerprint that holds the key, and its recorded response (None while in progress).
Found = tuple[bytes, bytes | None]

STORES: Final = ("memory", "sqlite", "redis", "postgres")
KEY_HEADER: Final = b"idempotency-key"
REPLAYED: Final = (b"idempotent-replayed", b"true")
DEFAULT_PREFIX: Final = "idempo-floor:"
DEFAULT_TABLE: Final = "idempo_floor"
DEFAULT_TTL: Final = 600  # seconds; Redis only
FINGERPRINT_SIZE: Final = 32  # a SHA-256 digest, kept raw


class Backend(Protocol):
    """**Protocol:** where the floor keeps its records: one round trip per call."""

    async def claim(self, key: str, fingerprint: bytes) -> Found | None:
        """Take *key* for *fingerprint* and return ``None``; or, if something holds it, return that."""

    async def record(self, key: str, fingerprint: bytes, response: bytes) -> None:
        """Store the response of the request that claimed *key* for *fingerprint*."""

    async def aclose(self) -> None:
        """Close the connections, if any were opened."""


# -- the middleware -----------------------------------------------------------------------------------------------


class FloorMiddleware:
    """The floor around *app*, on *backend* (see the module's docstring: NOT SAFE)."""

    def __init__(self, app: ASGIApp, backend: Backend) -> None:
        self.app = app
        self.backend = backend

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = None
        for name, value in scope["headers"]:
            if name == KEY_HEADER:
                key = value.decode("latin-1")
                break
        if key is None:
            await self.app(scope, receive, send)
            return
        message = await receive()
        body = message.get("body", b"")
        while message.get("more_body", False):
            message = await receive()
            body += message.get("body", b"")
        fingerprint = hashlib.sha256(b"%s %s\n%s" % (scope["method"].encode(), scope["raw_path"], body)).digest()
        found = await self.backend.claim(key, fingerprint)
        if found is not None:
            await self._answer(found, fingerprint, send)
            return
        delivered = False

        async def replay_body() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        start: Message = {}
        chunks: list[bytes] = []

        async def keep(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    # Recorded before the client has the whole response (as idempo does), so that a retry sent the
                    # moment it arrives finds the response, not the key in progress.
                    response = marshal.dumps((start["status"], list(start.get("headers", ())), b"".join(chunks)))
                    await self.backend.record(key, fingerprint, response)
            await send(message)

        await self.app(scope, replay_body, keep)

    @staticmethod
    async def _answer(found: Found, fingerprint: bytes, send: Send) -> None:
        held_by, response = found
        if held_by != fingerprint:
            await _plain(send, 422, b"Idempotency-Key reused with another request")
        elif response is None:
            await _plain(send, 409, b"a request with this Idempotency-Key is in progress")
        else:
            status, headers, body = marshal.loads(response)
            await send({"type": "http.response.start", "status": status, "headers": [*headers, REPLAYED]})
            await send({"type": "http.response.body", "body": body})


async def _plain(send: Send, status: int, text: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})


# -- the backends ---------------------------------------------------------------------------------------------------


class MemoryBackend:
    """A dict of the process: claim-or-read is one ``setdefault``."""

    def __init__(self) -> None:
        self.records: dict[str, Found] = {}

    async def claim(self, key: str, fingerprint: bytes) -> Found | None:
        new: Found = (fingerprint, None)
        found = self.records.setdefault(key, new)
        return None if found is new else found

    async def record(self, key: str, fingerprint: bytes, response: bytes) -> None:
        self.records[key] = (fingerprint, response)

    async def aclose(self) -> None:
        self.records.clear()


class SQLiteBackend:
    """The standard library's sqlite3, WAL and ``synchronous=NORMAL``, one connection on the event loop's thread."""

    def __init__(self, path: str, table: str = DEFAULT_TABLE) -> None:
        self.path = path
        self.table = table
        self._conn: sqlite3.Connection | None = None
        self._claim = f"INSERT INTO {table} (key, fingerprint) VALUES (?, ?) ON CONFLICT DO NOTHING RETURNING 1"
        self._read = f"SELECT fingerprint, response FROM {table} WHERE key = ?"
        self._record = f"UPDATE {table} SET response = ? WHERE key = ?"

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL, response BLOB)"
        )
        self._conn = conn
        return conn

    async def claim(self, key: str, fingerprint: bytes) -> Found | None:
        conn = self._conn or self._open()
        row: Found | None = conn.execute(self._read, (key,)).fetchone()
        if row is None:
            if conn.execute(self._claim, (key, fingerprint)).fetchone() is not None:
                return None
            row = conn.execute(self._read, (key,)).fetchone()  # another process's claim, between the two
        return row

    async def record(self, key: str, fingerprint: bytes, response: bytes) -> None:
        conn = self._conn or self._open()
        conn.execute(self._record, (response, key))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# KEYS[1] the key; ARGV[1] the fingerprint; ARGV[2] ttl in seconds. Returns false if the key was free (and is now
# taken), else what holds it: the fingerprint, followed by the marshal-ed response once recorded.
CLAIM_LUA: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
"""


class RedisBackend:
    """redis-py's asyncio client: ``EVALSHA`` of :data:`CLAIM_LUA` to claim or read, ``SET`` to record."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, ttl: int = DEFAULT_TTL) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self._client: Redis | None = None
        self._script: AsyncScript | None = None

    def _open(self) -> Redis:
        from redis.asyncio import Redis

        client = Redis.from_url(self.url)
        self._script = client.register_script(CLAIM_LUA)  # EVALSHA; SCRIPT LOAD on NOSCRIPT, once
        self._client = client
        return client

    async def claim(self, key: str, fingerprint: bytes) -> Found | None:
        if self._script is None:
            self._open()
            assert self._script is not None
        value: bytes | None = await self._script(keys=[self.prefix + key], args=[fingerprint, self.ttl])
        if value is None:
            return None
        return value[:FINGERPRINT_SIZE], value[FINGERPRINT_SIZE:] or None

    async def record(self, key: str, fingerprint: bytes, response: bytes) -> None:
        client = self._client or self._open()
        await client.set(self.prefix + key, fingerprint + response, ex=self.ttl)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class _PgConnection:
    """One asyncpg connection and its two prepared statements."""

    def __init__(self, conn: Any, claim: Any, record: Any) -> None:
        self.conn = conn
        self.claim = claim
        self.record = record


class PostgresBackend:
    """asyncpg, prepared statements; one connection, plus one per overlapping request (a free list)."""

    def __init__(self, url: str, table: str = DEFAULT_TABLE, max_connections: int = 16) -> None:
        self.url = url
        self.table = table
        self.max_connections = max_connections
        # Sub-statements of a WITH see the snapshot the statement started with: the SELECT finds the row that was
        # there (a replay, or another request's claim), never the one this INSERT adds (then no row: claimed).
        self._claim_sql = (
            f"WITH ins AS (INSERT INTO {table} (key, fingerprint) VALUES ($1, $2) ON CONFLICT DO NOTHING) "
            f"SELECT fingerprint, response FROM {table} WHERE key = $1"
        )
        self._record_sql = f"UPDATE {table} SET response = $2 WHERE key = $1"
        self._free: list[_PgConnection] = []
        self._waiters: deque[asyncio.Future[_PgConnection]] = deque()
        self._all: list[_PgConnection] = []
        self._opening = 0
        self._created = False

    async def _open(self) -> _PgConnection:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.url)
        if not self._created:
            # Another process may make it at the same moment (two uvicorn workers).
            with contextlib.suppress(asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table}"
                    " (key text PRIMARY KEY, fingerprint bytea NOT NULL, response bytea)"
                )
            self._created = True
        pg = _PgConnection(conn, await conn.prepare(self._claim_sql), await conn.prepare(self._record_sql))
        self._all.append(pg)
        return pg

    async def _acquire(self) -> _PgConnection:
        if self._free:
            return self._free.pop()
        if len(self._all) + self._opening < self.max_connections:
            self._opening += 1
            try:
                return await self._open()
            finally:
                self._opening -= 1
        waiter: asyncio.Future[_PgConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def _release(self, pg: _PgConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(pg)
                return
        self._free.append(pg)

    async def claim(self, key: str, fingerprint: bytes) -> Found | None:
        pg = await self._acquire()
        try:
            row = await pg.claim.fetchrow(key, fingerprint)
        finally:
            self._release(pg)
        return None if row is None else (row[0], row[1])

    async def record(self, key: str, fingerprint: bytes, response: bytes) -> None:
        pg = await self._acquire()
        try:
            await pg.record.fetch(key, response)
        finally:
            self._release(pg)

    async def aclose(self) -> None:
        every, self._all, self._free = self._all, [], []
        for pg in every:
            await pg.conn.close()


# -- the factories -------------------------------------------------------------------------------------------------


def open_backend(
    store: str, url: str | None = None, *, prefix: str = DEFAULT_PREFIX, table: str = DEFAULT_TABLE
) -> Backend:
    """The backend of *store*; nothing is connected until its first call. *url*: the SQLite file (default
    ``idempo-floor.db``), or a URL of the Redis or PostgreSQL server, as redis-py and asyncpg take it."""
    if store == "memory":
        return MemoryBackend()
    if store == "sqlite":
        return SQLiteBackend(url or "idempo-floor.db", table)
    if store == "redis":
        return RedisBackend(url or "redis://127.0.0.1:6379/0", prefix)
    if store == "postgres":
        return PostgresBackend(url or "postgresql://postgres@127.0.0.1:5432/test", table)
    msg = f"unknown floor store {store!r}; known: {', '.join(STORES)}"
    raise ValueError(msg)


def floor_app(
    app: ASGIApp, store: str, url: str | None = None, *, prefix: str = DEFAULT_PREFIX, table: str = DEFAULT_TABLE
) -> FloorMiddleware:
    """*app* behind the floor on *store* (see :func:`open_backend`), connected lazily, per process."""
    return FloorMiddleware(app, open_backend(store, url, prefix=prefix, table=table))


def floor_app_from_env(app: ASGIApp) -> FloorMiddleware:
    """:func:`floor_app` configured by ``IDEMPO_FLOOR_STORE``, ``IDEMPO_FLOOR_URL``, ``IDEMPO_FLOOR_PREFIX`` and
    ``IDEMPO_FLOOR_TABLE``."""
    return floor_app(
        app,
        os.environ.get("IDEMPO_FLOOR_STORE", "memory"),
        os.environ.get("IDEMPO_FLOOR_URL") or None,
        prefix=os.environ.get("IDEMPO_FLOOR_PREFIX", DEFAULT_PREFIX),
        table=os.environ.get("IDEMPO_FLOOR_TABLE", DEFAULT_TABLE),
    )
