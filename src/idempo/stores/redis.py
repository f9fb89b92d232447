"""``redis://``, ``rediss://``, ``redis+cluster://``: records in Redis, Valkey or a Redis Cluster, on redis-py.

Theory of operation. Each record is one Redis hash, under the key ``<prefix><store key>``, with the fields
``state``, ``fingerprint``, ``token``, ``created_at``, ``lease_expires_at``, ``expires_at`` (whole milliseconds
since the epoch) and, once completed, ``payload``. Every operation touches that one key and nothing else, so the
store runs unchanged on a Redis Cluster. ``claim``, ``renew``, ``complete`` and ``release`` are each one Lua
script (``idempo/stores/lua/*.lua``, each headed by its KEYS/ARGV contract), atomic on the server and sent with
``EVALSHA`` (redis-py loads a script again when the server answers ``NOSCRIPT``, e.g. after ``SCRIPT FLUSH`` or a
restart); ``get`` is one ``HMGET`` and ``delete`` one ``DEL``. ``scan`` (for ``idempo keys list``), which no request
runs, walks the keys with ``SCAN MATCH <prefix>* TYPE hash`` (on every primary of a cluster) and fetches each batch
of records with one pipeline of ``HMGET``s.

One clock. The scripts read the time from the server (``TIME``), never from the client, so that workers whose
clocks disagree still agree on when a lease or a record ran out. Redis drops a record itself when it expires
(``PEXPIREAT``), which is why ``purge_expired`` has nothing to do, and why a claim that finds a completed record
(a retry) answers it without reading the clock: Redis finds its key only while it lives.

Tokens are drawn by the client (:func:`~idempo._core.records.new_token`, or by the caller: ``claim(...,
token=...)``) and passed to ``claim``, which makes a claim safe to send twice: one that finds the key held with its
own token reports it acquired.

Eviction. Under a ``maxmemory-policy`` that evicts, Redis drops records silently at ``maxmemory`` and their retries
run again, so a store reads the policy of its server (of every primary of a cluster) before its first claim and
then from time to time, and by default refuses to claim while it evicts (``eviction=``; see ``._redis_eviction``).

At maxmemory (``noeviction``). Redis refuses a script's first write that may grow memory (``OOM``, raised as
:class:`~idempo.StoreFullError`), so a claim (whose first write is its ``HSET``) fails: nothing new starts. A claim
that finds a record, ``get``, ``release`` and ``delete`` (``DEL`` frees memory) still work. ``renew``, and
``complete`` with a payload of at most :data:`OOM_PAYLOAD_LIMIT` bytes (the middleware's "response not stored"
marker), run a variant of their script headed by ``#!lua flags=allow-oom`` (Redis 7), which may write anyway: each
overwrites fields of the record (a completion also clears its 32-byte token), so the record grows by a few dozen
bytes at most, and an operation that ran is recorded. A larger ``complete`` fails, so that its caller falls back to
the marker. A server without script flags (Redis 6) cannot compile a shebang: the store then runs the plain scripts
on it, and at maxmemory those fail too.

Failures are bounded. Every reply is waited for at most ``socket_timeout`` seconds and every connect at most
``socket_connect_timeout``; a command is retried once, and only after a connection error (e.g. a pooled connection
to a server that restarted), never after a timeout (a hung server may run it later, and waiting again would double
the delay). So a server that is down or hangs turns into :class:`~idempo.StoreError` within a few timeouts, and the
same store works again once it is back. (A connection that breaks after the command reached the server makes the
retry run it twice: harmless for ``claim``, ``renew`` and ``release``; a ``complete`` then reports ``False`` although
the payload was stored.) The asyncio store on one server bounds each command itself, its connect and retry
included, to ``socket_timeout`` in all, with one timer per event loop rather than redis-py's task and two timers
per command (``._redis_timeouts``). A cluster tries its nodes in turn, so its bound grows with the number of nodes.

Event loops. redis-py's asyncio connections belong to the event loop that opened them. A store built from a URL
(or a client factory) creates its client lazily, inside the running loop, on first use, and one client per loop
if several loops (threads) use it; so a store made at import time, before any loop runs, just works. A client you
pass in is used as it is, in whatever loop you use it, and stays yours to close.

Sync callers. :class:`SyncRedisStore` is the blocking twin, on redis-py's sync ``Redis`` / ``RedisCluster``: the same
Lua scripts, keys, URLs, options, retry policy and errors. Each operation is written once, as a plan
(``._redis_operations``: what it sends, in which order, and what the replies mean, the eviction check and the
scan's paging included), and the two stores differ only in whether they await what they send; no event loop runs
behind a sync caller's back. ``RedisStore.sync()`` gives the twin of a store built from a URL. URLs and clients are
``._redis_client``'s.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Self, TypeVar

from .._core.errors import ConfigurationError
from .._core.plans import iterate, iterate_async, run, run_async
from .._core.records import Claim, Record
from . import require
from ._redis_client import (
    DEFAULT_PREFIX,
    ClientFactory,
    SyncClientFactory,
    check_client,
    errors,
    parse_url,
    refuse_the_other_api,
    store_error,
)
from ._redis_eviction import DEFAULT_EVICTION, Eviction, Guard, check_mode
from ._redis_operations import (
    OOM_PAYLOAD_LIMIT,
    Effect,
    answered_at_once,
    claim_plan,
    delete_plan,
    fenced_plan,
    get_plan,
    operation,
    scan_plan,
    script_table,
    send,
)
from ._redis_timeouts import Deadlines
from ._url import StoreURL

if TYPE_CHECKING:
    from ._redis_client import Client, SyncClient

__all__ = ["OOM_PAYLOAD_LIMIT", "RedisStore", "SyncRedisStore"]

_T = TypeVar("_T")


class _Bound:
    """One client, the store's scripts on it (a server without script flags gets the plain ones for good), the
    store's bound on its commands (``None``: the client's own ``socket_timeout``), and whether it is ready for
    concurrent use (an asyncio cluster client is not, until :meth:`prepare`)."""

    __slots__ = ("client", "deadlines", "ready", "scripts")

    def __init__(self, client: Any, *, ready: bool, deadlines: Deadlines | None = None) -> None:
        self.client = client
        self.scripts = script_table()
        self.ready = ready
        self.deadlines = deadlines

    async def prepare(self) -> None:
        """Learn a cluster's slots before the first command. redis-py routes the commands that arrive while it is
        still learning them by a guess (and then follows MOVED redirects, tearing down connections that other
        commands are still opening)."""
        await self.client.initialize()
        self.ready = True


class _RedisBase:
    """What :class:`RedisStore` and :class:`SyncRedisStore` share: the prefix, the eviction guard, and each
    operation's plan, wrapped so that redis-py's failures name the operation. Strictly private."""

    _prefix: str
    _where: str
    _guard: Guard

    def _claim(
        self, key: str, fingerprint: str, lease: float, ttl: float, token: str | None
    ) -> Generator[Any, Any, Claim]:
        plan = claim_plan(self._prefix, key, fingerprint, lease, ttl, token, self._guard, self._where)
        return operation("claim", self._where, plan)

    def _fenced(self, name: str, key: str, *args: Any) -> Generator[Any, Any, bool]:
        return operation(name, self._where, fenced_plan(name, self._prefix, key, args))

    def _get(self, key: str) -> Generator[Any, Any, Record | None]:
        return operation("get", self._where, get_plan(self._prefix, key))

    def _delete(self, key: str) -> Generator[Any, Any, bool]:
        return operation("delete", self._where, delete_plan(self._prefix, key))

    def _scan(self, prefix: str, limit: int | None) -> Generator[Any, Any, None]:
        return operation("scan", self._where, scan_plan(self._prefix, prefix, limit))


class RedisStore(_RedisBase):
    """Records in Redis (or Valkey, or a Redis Cluster): shared by every worker of every machine.

    Each operation is one Lua script or one command on one key, so it is atomic and runs on a cluster too. Records
    expire by Redis TTL. Times come from the server's clock. Open one with :func:`~idempo.store_from_url`
    (``redis://``, ``rediss://``, ``redis+cluster://``; see :meth:`from_url`), or wrap a client of your own::

        store = RedisStore(redis.asyncio.Redis(host="cache"), prefix="myapp:idem:")

    For sync callers, :meth:`sync` gives its blocking twin, a :class:`SyncRedisStore` on the same server.

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` made with
            ``decode_responses=False`` (payloads are bytes), which the store uses as it is and never closes; or a
            callable that makes one, which the store calls lazily, once in each event loop that uses it, and whose
            clients :meth:`close` closes.
        prefix: prepended to every store key to make the Redis key (``"idempo:"`` by default).
        eviction: what to do when the server (any primary of a cluster) may evict records: its
            ``maxmemory-policy`` evicts (``volatile-*``, ``allkeys-*``) under a ``maxmemory`` limit, or the policy
            cannot be read (neither ``CONFIG GET`` nor ``INFO`` allowed). ``"refuse"`` (the default): claims fail
            with a :class:`~idempo.StoreError` that says what to set, until the server is fixed (the store looks
            again a second later); renewing, completing and releasing claims already taken, and reading records,
            still work. ``"warn"``: one warning in the log, then claims go ahead. ``"ignore"``: never looks.

    Raises:
        MissingDependency: redis-py is not installed (``pip install 'idempo[redis]'``).
        ConfigurationError: the client decodes responses, or *eviction* is not one of the three.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        client: Client | Callable[[], Client],
        *,
        prefix: str = DEFAULT_PREFIX,
        eviction: Eviction = DEFAULT_EVICTION,
    ) -> None:
        require("redis", extra="redis")
        from redis.asyncio import Redis, RedisCluster

        self._prefix = prefix
        self._errors = errors()
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, _Bound] = {}
        self._shared: _Bound | None = None
        self._factory: Callable[[], Client] | None = None
        self._twin: SyncRedisStore | None = None
        refuse_the_other_api(client, sync=False)
        if isinstance(client, Redis | RedisCluster):
            check_client(client)
            self._shared = _Bound(client, ready=isinstance(client, Redis))
            self._where = f"<{type(client).__name__}>"
        else:
            self._factory = client
            self._where = repr(client)
        # Seconds a command may take, bounded by the store (a client made from a URL for one server); None: by the
        # client's own socket_timeout.
        self._timeout = client.config.reply_timeout if isinstance(client, ClientFactory) else None
        self._guard = Guard(check_mode(eviction), self._where)

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from a URL; the client is created on first use.

        * ``redis://[[user]:password@]host[:port][/db]`` (port 6379 and database 0 by default)
        * ``rediss://...``: the same over TLS; query options ``ssl_cert_reqs`` (``none``, ``optional``,
          ``required``), ``ssl_ca_certs`` (a file), ``ssl_check_hostname`` (``true``/``false``)
        * ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster, found from these nodes

        Query options: ``prefix`` (default ``idempo:``), ``eviction`` (``refuse``, ``warn`` or ``ignore``; see
        the class), ``timeout`` (seconds a reply may take, default 2) and ``connect_timeout`` (seconds a connection
        may take, default 1). Keyword *options* override them: ``prefix``, ``eviction``, ``socket_timeout``,
        ``socket_connect_timeout``, and any other keyword of redis-py's ``Redis`` or ``RedisCluster``, passed on
        to it (e.g. ``max_connections``, ``ssl_ca_data``).

        Raises:
            ConfigurationError: a malformed URL, or an unknown or invalid option.
            MissingDependency: redis-py is not installed.
        """
        require("redis", extra="redis")
        prefix, eviction, config = parse_url(url, options)
        config.check(sync=False)
        return cls(ClientFactory(config), prefix=prefix, eviction=eviction)

    def __repr__(self) -> str:
        return f"RedisStore({self._where}, prefix={self._prefix!r})"

    def sync(self) -> SyncRedisStore:
        """The blocking twin of this store (for the decorator on sync functions): a :class:`SyncRedisStore` on the
        same server, with the same options, prefix and eviction mode, and connections (and eviction checks) of its
        own. The same twin every time; :meth:`close` closes its connections too.

        Raises:
            ConfigurationError: the store wraps a client of yours (or a factory of yours): make a
                ``SyncRedisStore`` from a sync client of yours instead.
        """
        if not isinstance(self._factory, ClientFactory):
            msg = (
                "RedisStore.sync() needs a store built from a URL; this one uses your own client: make the sync "
                "twin from your sync client, e.g. SyncRedisStore(redis.Redis(...), prefix=...)"
            )
            raise ConfigurationError(msg)
        with self._lock:
            if self._twin is None:
                config = self._factory.config
                config.check(sync=True)
                self._twin = SyncRedisStore(SyncClientFactory(config), prefix=self._prefix, eviction=self._guard.mode)
            return self._twin

    # -- clients, and the effects performed on them, awaited -------------------------------------------------------

    def _bound(self) -> _Bound:
        """The client (and scripts) of the running event loop."""
        if self._shared is not None:
            return self._shared
        loop = asyncio.get_running_loop()
        bound = self._by_loop.get(loop)
        return bound if bound is not None else self._bind_loop(loop)

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> _Bound:
        assert self._factory is not None
        with self._lock:
            bound = self._by_loop.get(loop)
            if bound is None:
                # A loop that was closed without closing the store took its client's connections with it.
                for closed in [other for other in self._by_loop if other.is_closed()]:
                    del self._by_loop[closed]
                from redis.asyncio import Redis

                client = self._factory()
                check_client(client)
                deadlines = None if self._timeout is None else Deadlines(loop, self._timeout)
                bound = self._by_loop[loop] = _Bound(client, ready=isinstance(client, Redis), deadlines=deadlines)
        return bound

    async def _perform(self, effect: Effect) -> Any:
        bound = self._bound()
        if not bound.ready:
            await bound.prepare()
        if answered_at_once(effect):
            return send(bound.client, bound.scripts, self._where, effect)
        deadlines = bound.deadlines
        if deadlines is None:
            return await send(bound.client, bound.scripts, self._where, effect)
        task = deadlines.start()
        try:
            return await send(bound.client, bound.scripts, self._where, effect)
        except asyncio.CancelledError:
            if not deadlines.ran_out(task):
                raise
            from redis.exceptions import TimeoutError as RedisTimeoutError

            msg = f"no reply within {deadlines.timeout:g} s"
            raise RedisTimeoutError(msg) from None
        finally:
            deadlines.finish(task)

    # -- the Store protocol -------------------------------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`. Refused (:class:`~idempo.StoreError`) while the server may evict
        records, unless the store was made with ``eviction="warn"`` or ``"ignore"``; and when the server is at
        ``maxmemory``. *token*: the new owner's fencing token, if the caller drew it (else the store draws one)."""
        return await run_async(self._claim(key, fingerprint, lease, ttl, token), self._perform)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return await run_async(self._fenced("renew", key, token, lease), self._perform)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return await run_async(self._fenced("complete", key, token, payload, ttl), self._perform)

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return await run_async(self._fenced("release", key, token), self._perform)

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`. Redis has dropped an expired record already."""
        return await run_async(self._get(key), self._perform)

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return await run_async(self._delete(key), self._perform)

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Always 0: Redis removes expired records on its own."""
        return 0

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. In no particular order: ``SCAN`` walks the keys under the
        store's prefix (on every primary of a cluster), 200 at a time, and each batch of records comes in one
        pipeline. It reads the whole keyspace of the server (``MATCH`` filters what ``SCAN`` walks), a few hundred
        keys per round trip, without blocking the server."""
        return iterate_async(self._scan(prefix, limit), Record, self._perform)

    async def close(self) -> None:
        """Close the clients the store made, in every event loop that is still running, and those of its
        :meth:`sync` twin. A client you passed in is left open: close it yourself. The store makes a new client if
        it is used again."""
        if self._shared is not None:
            return
        with self._lock:
            by_loop, self._by_loop = self._by_loop, {}
            twin = self._twin
        if twin is not None:
            twin.close()  # closes sockets; nothing to wait for
        loop = asyncio.get_running_loop()
        failure: Exception | None = None
        for other, bound in by_loop.items():
            try:
                if other is loop:
                    await bound.client.aclose()
                elif other.is_running():
                    # Another thread's loop: its connections must be closed there.
                    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(bound.client.aclose(), other))
            except self._errors as exc:
                failure = failure or exc
        if failure is not None:
            raise store_error(self._where, "close", failure) from failure


class SyncRedisStore(_RedisBase):
    """The blocking twin of :class:`RedisStore`, on redis-py's sync client: the same scripts, keys, URLs, options,
    retry policy and errors, for sync callers (the decorator on plain functions, workers, scripts). Safe to share
    between threads (redis-py's sync client keeps a pool of connections). Open one with
    :func:`~idempo.sync_store_from_url` (the URLs of :meth:`RedisStore.from_url`), from a ``RedisStore`` with
    :meth:`RedisStore.sync`, or wrap a client of your own::

        store = SyncRedisStore(redis.Redis(host="cache"), prefix="myapp:idem:")

    Args:
        client: a ``redis.Redis`` or ``redis.cluster.RedisCluster`` made with ``decode_responses=False``, which the
            store uses as it is and never closes; or a callable that makes one, which the store calls on first use
            (and again after :meth:`close`), and whose client :meth:`close` closes.
        prefix: prepended to every store key to make the Redis key (``"idempo:"`` by default).
        eviction: ``"refuse"`` (the default), ``"warn"`` or ``"ignore"``: see :class:`RedisStore`.

    Raises:
        MissingDependency: redis-py is not installed (``pip install 'idempo[redis]'``).
        ConfigurationError: the client decodes responses, or is an asyncio client, or *eviction* is not one of
            the three.
    """

    def __init__(
        self,
        client: SyncClient | Callable[[], SyncClient],
        *,
        prefix: str = DEFAULT_PREFIX,
        eviction: Eviction = DEFAULT_EVICTION,
    ) -> None:
        require("redis", extra="redis")
        import redis

        self._prefix = prefix
        self._errors = errors()
        self._lock = threading.Lock()
        self._shared: _Bound | None = None  # the client and its scripts, swapped as one (read without the lock)
        self._factory: Callable[[], SyncClient] | None = None
        refuse_the_other_api(client, sync=True)
        if isinstance(client, redis.Redis | redis.RedisCluster):
            check_client(client)
            self._shared = _Bound(client, ready=True)
            self._owned = False
            self._where = f"<{type(client).__name__}>"
        else:
            self._factory = client
            self._owned = True
            self._where = repr(client)
        self._guard = Guard(check_mode(eviction), self._where)

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from a URL, as :meth:`RedisStore.from_url` does (the same URLs and options); the client is
        created on first use.

        Raises:
            ConfigurationError: a malformed URL, or an unknown or invalid option.
            MissingDependency: redis-py is not installed.
        """
        require("redis", extra="redis")
        prefix, eviction, config = parse_url(url, options)
        config.check(sync=True)
        return cls(SyncClientFactory(config), prefix=prefix, eviction=eviction)

    def __repr__(self) -> str:
        return f"SyncRedisStore({self._where}, prefix={self._prefix!r})"

    # -- the client, and the effects performed on it, blocking ------------------------------------------------------

    def _bound(self) -> _Bound:
        """The client and its scripts, made on first use. (A cluster client connects as it is made: a failure
        to reach the cluster is raised here, and the next operation tries again.)"""
        bound = self._shared
        if bound is not None:
            return bound
        assert self._factory is not None
        with self._lock:
            bound = self._shared
            if bound is None:
                made = self._factory()
                try:
                    check_client(made)
                except ConfigurationError:
                    made.close()
                    raise
                bound = self._shared = _Bound(made, ready=True)
            return bound

    def _perform(self, effect: Effect) -> Any:
        bound = self._bound()
        return send(bound.client, bound.scripts, self._where, effect)

    # -- the SyncStore protocol ---------------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`RedisStore.claim`."""
        return run(self._claim(key, fingerprint, lease, ttl, token), self._perform)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return run(self._fenced("renew", key, token, lease), self._perform)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return run(self._fenced("complete", key, token, payload, ttl), self._perform)

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return run(self._fenced("release", key, token), self._perform)

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`. Redis has dropped an expired record already."""
        return run(self._get(key), self._perform)

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return run(self._delete(key), self._perform)

    def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Always 0: Redis removes expired records on its own."""
        return 0

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`RedisStore.scan`."""
        return iterate(self._scan(prefix, limit), Record, self._perform)

    def close(self) -> None:
        """Close the client the store made. A client you passed in is left open: close it yourself. The store
        makes a new client if it is used again."""
        if not self._owned:
            return
        with self._lock:
            bound, self._shared = self._shared, None
        if bound is not None:
            try:
                bound.client.close()
            except self._errors as exc:
                raise store_error(self._where, "close", exc) from exc
