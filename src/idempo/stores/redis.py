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
(``PEXPIREAT``), which is why ``purge_expired`` has nothing to do.

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

Failures are bounded. Every socket read waits at most ``socket_timeout`` seconds and every connect at most
``socket_connect_timeout``; a command is retried once, and only after a connection error (e.g. a pooled connection
to a server that restarted), never after a timeout (a hung server may run it later, and waiting again would double
the delay). So a server that is down or hangs turns into :class:`~idempo.StoreError` within a few timeouts, and the
same store works again once it is back. (A connection that breaks after the command reached the server makes the
retry run it twice: harmless for ``claim``, ``renew`` and ``release``; a ``complete`` then reports ``False`` although
the payload was stored.) A cluster tries its nodes in turn, so its bound grows with the number of nodes.

Event loops. redis-py's asyncio connections belong to the event loop that opened them. A store built from a URL
(or a client factory) creates its client lazily, inside the running loop, on first use, and one client per loop
if several loops (threads) use it; so a store made at import time, before any loop runs, just works. A client you
pass in is used as it is, in whatever loop you use it, and stays yours to close.

Sync callers. :class:`SyncRedisStore` is the blocking twin, on redis-py's sync ``Redis`` / ``RedisCluster``: the same
Lua scripts, keys, URLs, options, retry policy and errors. Each operation is written once (``_Op``: what it
sends and what its reply means) and run by either store's runner; no event loop runs behind a sync caller's back.
``RedisStore.sync()`` gives the twin of a store built from a URL.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Generic, Self, TypeAlias, TypeVar
from urllib.parse import unquote

from .._core.errors import ConfigurationError, StoreError, StoreFullError
from .._core.records import Acquired, Claim, Existing, Record, State, new_token
from . import require
from ._redis_eviction import (
    DEFAULT_EVICTION,
    ConfigGet,
    Eviction,
    Guard,
    InfoMemory,
    Reading,
    check_mode,
    readings_plan,
)
from ._scan import ScanPlan, check_limit, glob_prefix, run_plan, run_plan_async
from ._url import StoreURL, redact

if TYPE_CHECKING:
    import redis
    import redis.cluster
    from redis.asyncio import Redis, RedisCluster
    from redis.commands.core import AsyncScript, Script

    Client: TypeAlias = Redis | RedisCluster
    SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster

__all__ = ["OOM_PAYLOAD_LIMIT", "RedisStore", "SyncRedisStore"]

_T = TypeVar("_T")

logger = logging.getLogger("idempo")

DEFAULT_PREFIX = "idempo:"
DEFAULT_TIMEOUT = 2.0
DEFAULT_CONNECT_TIMEOUT = 1.0
_DEFAULT_PORT = 6379
_SCRIPTS = ("claim", "renew", "complete", "release")
_AT_OOM = ("renew", "complete")  # each also registered as "<name>_at_oom": its script headed by _ALLOW_OOM
_ALLOW_OOM = "#!lua flags=allow-oom\n"
_NO_FLAGS = "Error compiling script"  # what a server without script flags (Redis 6) answers to a shebang
OOM_PAYLOAD_LIMIT = 64
"""A ``complete`` whose payload is at most this many bytes is written even when the server is at ``maxmemory``
(``noeviction``): the record then grows by a few dozen bytes at most (it loses its 32-byte token), and keeps
Redis's compact hash encoding (``hash-max-listpack-value`` is 64 by default). Larger payloads fail there, so that
their caller records a marker instead."""
_FIELDS = ("state", "fingerprint", "token", "created_at", "lease_expires_at", "expires_at", "payload")
_STATES = {b"in_progress": State.IN_PROGRESS, b"completed": State.COMPLETED}
_URL_OPTIONS = (
    "prefix",
    "eviction",
    "timeout",
    "connect_timeout",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_check_hostname",
)
_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname")
_SCAN_COUNT = 200  # SCAN's COUNT hint: keys looked at per SCAN call, and so at most records per pipeline


@cache
def _script(name: str) -> str:
    return (importlib.resources.files("idempo.stores") / "lua" / f"{name}.lua").read_text("utf-8")


def _ms(seconds: float) -> int:
    """Whole milliseconds, as the scripts and ``PEXPIREAT`` count them."""
    return max(0, round(seconds * 1000))


def _record(key: str, fields: Sequence[Any]) -> Record:
    """A ``Record`` from the values of ``_FIELDS``, as ``HMGET`` or the claim script return them."""
    state, fingerprint, token, created_at, lease_expires_at, expires_at, payload = fields
    return Record(
        key,
        _STATES[state],
        fingerprint.decode(),
        token.decode(),
        int(created_at) / 1000,
        int(lease_expires_at) / 1000,
        int(expires_at) / 1000,
        payload,
    )


# -- the operations, written once for both stores ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Op(Generic[_T]):
    """One operation, *name*: what it sends (*script* with *args* on *key*, or for ``get``/``delete`` one command)
    and what its reply means (*parse*). :class:`RedisStore` awaits it, :class:`SyncRedisStore` blocks on it."""

    name: str
    key: str
    args: tuple[Any, ...]
    parse: Callable[[Any], _T]
    script: str = ""


def _claim(key: str, fingerprint: str, lease: float, ttl: float, token: str | None) -> _Op[Claim]:
    if token is None:
        token = new_token()
    elif not token:
        msg = "a claim's token must not be empty (a completed record's token is empty)"
        raise ValueError(msg)

    def parse(reply: Any) -> Claim:
        return Acquired(token) if reply == 1 else Existing(_record(key, reply))

    return _Op("claim", key, (fingerprint, token, _ms(lease), _ms(ttl)), parse, "claim")


def _done(reply: Any) -> bool:
    return bool(reply == 1)


def _renew(key: str, token: str, lease: float) -> _Op[bool]:
    return _Op("renew", key, (token, _ms(lease)), _done, "renew_at_oom")


def _complete(key: str, token: str, payload: bytes, ttl: float) -> _Op[bool]:
    script = "complete_at_oom" if len(payload) <= OOM_PAYLOAD_LIMIT else "complete"
    return _Op("complete", key, (token, payload, _ms(ttl)), _done, script)


def _release(key: str, token: str) -> _Op[bool]:
    return _Op("release", key, (token,), _done, "release")


def _get(key: str) -> _Op[Record | None]:
    return _Op("get", key, (), lambda fields: None if fields[0] is None else _record(key, fields))


def _delete(key: str) -> _Op[bool]:
    return _Op("delete", key, (), _done)


def _send(client: Any, scripts: dict[str, Any], prefix: str, op: _Op[Any]) -> Any:
    """Send *op* on *client*: its reply from a sync client, an awaitable of it from an async one."""
    if op.name == "get":
        return client.hmget(prefix + op.key, _FIELDS)
    if op.name == "delete":
        return client.delete(prefix + op.key)
    # EVALSHA; redis-py's Script loads the script again when the server answers NOSCRIPT.
    return scripts[op.script](keys=[prefix + op.key], args=op.args)


def _without_flags(scripts: dict[str, Any], op: _Op[Any], exc: Exception, where: str) -> bool:
    """Whether *op* failed only because the server cannot compile its script's shebang (Redis 6). If so, its
    ``*_at_oom`` scripts are replaced by the plain ones in *scripts* for good, and *op* may be sent again (its script
    never ran)."""
    if not op.script.endswith("_at_oom") or _NO_FLAGS not in str(exc):
        return False
    if scripts[op.script] is scripts[op.name]:
        return False  # the plain script failed to compile: not a matter of flags
    for name in _AT_OOM:
        scripts[f"{name}_at_oom"] = scripts[name]
    logger.warning(
        "idempo: Redis store %s: the server does not take script flags (Redis < 7), so at maxmemory renewals and "
        "the small 'response not stored' marker cannot be written either (%s)",
        where,
        exc,
    )
    return True


# -- scan, written once for both stores: a plan of requests (see ._scan) --------------------------------------------


class _ScanRequest:
    """What a scan asks its runner to send (one of the subclasses below)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class _Nodes(_ScanRequest):
    """Request: the nodes to scan. The result is ``[None]`` for one server, the primaries of a cluster."""


@dataclass(frozen=True, slots=True)
class _ScanKeys(_ScanRequest):
    """Request: ``SCAN cursor MATCH match COUNT batch TYPE hash`` on *node*. The result is redis-py's reply:
    ``(cursor, keys)``, or ``({node name: cursor}, keys)`` from a cluster client."""

    node: Any
    cursor: int
    match: str
    batch: int


@dataclass(frozen=True, slots=True)
class _Fetch(_ScanRequest):
    """Request: the fields of *keys*, in one pipeline of ``HMGET``s. The result is a list of field lists."""

    keys: list[bytes]


def _scan_plan(store_prefix: str, prefix: str, limit: int | None) -> ScanPlan[_ScanRequest]:
    """``scan``: the keys under ``<store prefix><prefix>`` (taken literally), node after node, and their records.

    SCAN may return a key more than once (while Redis rehashes): a key already listed is skipped. A key that
    expired or was deleted between SCAN and HMGET, or a hash under the prefix that is not a record, is skipped."""
    check_limit(limit)
    if limit == 0:
        return
    match = glob_prefix(store_prefix + prefix)
    nodes: list[Any] = yield _Nodes()
    seen: set[bytes] = set()
    listed = 0
    for node in nodes:
        cursor = 0
        while True:
            reply: tuple[Any, list[bytes]] = yield _ScanKeys(node, cursor, match, _SCAN_COUNT)
            next_cursor, keys = reply
            cursor = int(next_cursor[node.name] if isinstance(next_cursor, dict) else next_cursor)
            fresh = [key for key in dict.fromkeys(keys) if key not in seen]
            seen.update(fresh)
            if fresh:
                replies: list[list[Any]] = yield _Fetch(fresh)
                for raw, fields in zip(fresh, replies, strict=True):
                    record = _scanned(raw, store_prefix, fields)
                    if record is not None:
                        yield record
                        listed += 1
                        if listed == limit:
                            return
            if cursor == 0:
                break


def _scanned(raw: bytes, store_prefix: str, fields: Sequence[Any]) -> Record | None:
    """The record of Redis key *raw*, from its ``HMGET`` fields; ``None`` if it is gone or not a record."""
    if fields[0] not in _STATES or any(value is None for value in fields[1:6]):
        return None
    try:
        key = raw.decode()
    except UnicodeDecodeError:
        return None  # not written by a store: store keys are str
    return _record(key[len(store_prefix) :], fields)


def _send_request(client: Any, request: _ScanRequest | ConfigGet | InfoMemory) -> Any:
    """Send *request* (of a scan or of the eviction check) on *client*: its result from a sync client, an awaitable
    of it from an async one (except ``_Nodes``, answered at once)."""
    cluster = hasattr(client, "get_primaries")
    if isinstance(request, _Nodes):
        return client.get_primaries() if cluster else [None]
    if isinstance(request, _ScanKeys | ConfigGet | InfoMemory):
        where = {"target_nodes": request.node} if cluster else {}
        if isinstance(request, ConfigGet):
            return client.config_get("maxmemory*", **where)
        if isinstance(request, InfoMemory):
            return client.info("memory", **where)
        return client.scan(cursor=request.cursor, match=request.match, count=request.batch, _type="hash", **where)
    if not isinstance(request, _Fetch):  # pragma: no cover - no other requests
        raise TypeError(request)
    pipe = client.pipeline(transaction=False)
    for key in request.keys:
        pipe.hmget(key, _FIELDS)
    return pipe.execute()


def _register(client: Any) -> dict[str, Any]:
    """The store's scripts, registered on *client* (sync or async): each under its name, and the variants that may
    write at maxmemory under ``<name>_at_oom``. (Registering computes a digest; the server loads a script when it is
    first run.)"""
    scripts = {name: client.register_script(_script(name)) for name in _SCRIPTS}
    for name in _AT_OOM:
        scripts[f"{name}_at_oom"] = client.register_script(_ALLOW_OOM + _script(name))
    return scripts


def _eviction_check(client: Any, where: str) -> Generator[_Nodes | ConfigGet | InfoMemory, Any, list[Reading]]:
    """The eviction check on *client*: its primaries (or its one server, named *where*), then their policies."""
    nodes = yield _Nodes()
    return (yield from readings_plan(nodes, lambda node: where if node is None else node.name))


def _check_sync(client: SyncClient, where: str, refused: type[Exception]) -> list[Reading]:
    """Run the eviction check with blocking calls. A server's error reply (*refused*) goes to the plan."""
    plan = _eviction_check(client, where)
    reply: Any = None
    while True:
        try:
            request = plan.send(reply)
        except StopIteration as done:
            readings: list[Reading] = done.value
            return readings
        try:
            reply = _send_request(client, request)
        except refused as exc:
            reply = exc


async def _check_async(client: Client, where: str, refused: type[Exception]) -> list[Reading]:
    """Run the eviction check in an event loop, as :func:`_check_sync` does."""
    plan = _eviction_check(client, where)
    reply: Any = None
    while True:
        try:
            request = plan.send(reply)
        except StopIteration as done:
            readings: list[Reading] = done.value
            return readings
        try:
            sent = _send_request(client, request)
            reply = await sent if inspect.isawaitable(sent) else sent
        except refused as exc:
            reply = exc


def _check_client(client: Any) -> None:
    """Refuse a client (sync or async) that decodes responses: payloads are bytes."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        decodes = bool(pool.connection_kwargs.get("decode_responses"))
    else:
        decodes = client.get_encoder().decode_responses
    if decodes:
        msg = "the Redis client must be made with decode_responses=False: payloads are bytes"
        raise ConfigurationError(msg)


def _refuse_the_other_api(client: object, *, sync: bool) -> None:
    """A sync client given to :class:`RedisStore`, or an asyncio one to :class:`SyncRedisStore`, fails at once."""
    import redis
    import redis.asyncio

    if sync and isinstance(client, redis.asyncio.Redis | redis.asyncio.RedisCluster):
        msg = f"{type(client).__name__} is redis-py's asyncio client: use RedisStore, or redis-py's sync client"
        raise ConfigurationError(msg)
    if not sync and isinstance(client, redis.Redis | redis.RedisCluster):
        msg = f"{type(client).__name__} is redis-py's sync client: use SyncRedisStore, or redis.asyncio's client"
        raise ConfigurationError(msg)


def _store_error(where: str, operation: str, exc: Exception) -> StoreError:
    """The error a store raises for redis-py's *exc*: :class:`~idempo.StoreFullError` when the server refused a
    write at ``maxmemory`` (a smaller one may still land), else :class:`~idempo.StoreError`."""
    from redis.exceptions import OutOfMemoryError

    kind = StoreFullError if isinstance(exc, OutOfMemoryError) else StoreError
    return kind(f"Redis store {where}: {operation} failed: {type(exc).__name__}: {exc}")


def _errors() -> tuple[type[Exception], ...]:
    """What redis-py raises on a failure. OSError covers the builtin TimeoutError (asyncio's) and socket errors
    redis-py lets through."""
    from redis.exceptions import RedisClusterException, RedisError

    return (RedisError, RedisClusterException, OSError)


class _Bound:
    """One client, the store's scripts registered on it, and whether it is ready for concurrent use."""

    __slots__ = ("client", "ready", "scripts")

    def __init__(self, client: Client) -> None:
        from redis.asyncio import Redis

        self.client = client
        self.scripts: dict[str, AsyncScript] = _register(client)
        self.ready = isinstance(client, Redis)

    async def prepare(self) -> None:
        """Learn a cluster's slots before the first command. redis-py routes the commands that arrive while it is
        still learning them by a guess (and then follows MOVED redirects, tearing down connections that other
        commands are still opening)."""
        await self.client.initialize()
        self.ready = True


def _host_port(address: str, url: StoreURL) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6 address]:port``."""
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            msg = f"bad address {address!r} in {redact(url.raw)!r}"
            raise ConfigurationError(msg)
        port = rest[1:]
    else:
        host, _, port = address.partition(":")
    try:
        number = int(port) if port else _DEFAULT_PORT
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        msg = f"port {port!r} of {redact(url.raw)!r} is not a port number"
        raise ConfigurationError(msg)
    return host or "localhost", number


class _ClientOptions:
    """The client options parsed once from a URL, for a sync or an async client. Strictly private. Its repr hides
    the password."""

    def __init__(self, url: StoreURL, cluster: bool, nodes: list[tuple[str, int]], options: dict[str, Any]) -> None:
        self.url = url
        self.cluster = cluster
        self.nodes = nodes
        self.options = options

    def __repr__(self) -> str:
        return repr(redact(self.url.raw))

    def check(self, *, sync: bool) -> None:
        """Check the keywords for redis-py's sync or async client now, at start-up, rather than in the first
        request that creates the client."""
        import redis
        import redis.asyncio
        import redis.cluster

        name = "RedisCluster" if self.cluster else "Redis"
        target: Any = getattr(redis if sync else redis.asyncio, name)
        try:
            inspect.signature(target).bind(**self.options)
            if sync and self.cluster:
                # The sync RedisCluster takes **kwargs and silently drops those it does not pass on to its nodes.
                known = set(inspect.signature(target).parameters) | set(redis.cluster.REDIS_ALLOWED_KEYS)
                unknown = sorted(set(self.options) - known)
                if unknown:
                    msg = f"got an unexpected keyword argument {unknown[0]!r}"
                    raise TypeError(msg)
        except TypeError as exc:
            msg = f"invalid option for redis-py's {name} ({redact(self.url.raw)!r}): {exc}"
            raise ConfigurationError(msg) from None

    def async_client(self) -> Client:
        from redis.asyncio import Redis, RedisCluster
        from redis.asyncio.cluster import ClusterNode
        from redis.asyncio.retry import Retry

        options = {"retry": _retry(Retry), **self.options}
        if self.cluster:
            return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self.nodes], **options)
        ((host, port),) = self.nodes
        return Redis(host=host, port=port, **options)

    def sync_client(self) -> SyncClient:
        """A sync client. (A sync ``RedisCluster`` connects to learn the cluster's slots as it is made.)"""
        from redis import Redis, RedisCluster
        from redis.cluster import ClusterNode
        from redis.retry import Retry

        options = {"retry": _retry(Retry), **self.options}
        if self.cluster:
            nodes = [ClusterNode(host, port) for host, port in self.nodes]  # type: ignore[no-untyped-call]
            return RedisCluster(startup_nodes=nodes, **options)
        ((host, port),) = self.nodes
        return Redis(host=host, port=port, **options)


class _ClientFactory:
    """Makes an async client from a URL's options. Strictly private."""

    __slots__ = ("config",)

    def __init__(self, config: _ClientOptions) -> None:
        self.config = config

    def __repr__(self) -> str:
        return repr(self.config)

    def __call__(self) -> Client:
        return self.config.async_client()


class _SyncClientFactory:
    """Makes a sync client from a URL's options. Strictly private."""

    __slots__ = ("config",)

    def __init__(self, config: _ClientOptions) -> None:
        self.config = config

    def __repr__(self) -> str:
        return repr(self.config)

    def __call__(self) -> SyncClient:
        return self.config.sync_client()


def _retry(retry_class: Callable[..., _T]) -> _T:
    """One more try after a connection error only: a pooled connection may be to a server that restarted. Never
    after a timeout: the server may have run the command, and waiting again would double the delay. (*retry_class*:
    redis-py's sync or asyncio ``Retry``.)"""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return retry_class(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _parse_url(url: StoreURL, options: dict[str, Any]) -> tuple[str, Eviction, _ClientOptions]:
    """The prefix, eviction mode and client options of a ``redis://``, ``rediss://`` or ``redis+cluster://`` URL,
    with keyword *options* overriding its query (see :meth:`RedisStore.from_url`)."""
    where = redact(url.raw)
    unknown = sorted(set(url.options) - set(_URL_OPTIONS))
    if unknown:
        msg = f"unknown option {unknown[0]!r} in {where!r}; known options: {', '.join(_URL_OPTIONS)}"
        raise ConfigurationError(msg)
    options = dict(options)
    cluster = url.scheme == "redis+cluster"
    tls = url.scheme == "rediss"
    prefix = options.pop("prefix", url.option("prefix", DEFAULT_PREFIX))
    eviction = check_mode(options.pop("eviction", url.option("eviction", DEFAULT_EVICTION)))
    client_options: dict[str, Any] = {
        "socket_timeout": url.float_option("timeout", DEFAULT_TIMEOUT),
        "socket_connect_timeout": url.float_option("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        "decode_responses": False,
    }
    credentials, at, hosts = url.netloc.rpartition("@")
    if at:
        username, colon, password = credentials.partition(":")
        client_options["username"] = unquote(username) or None
        client_options["password"] = unquote(password) if colon else None
    addresses = hosts.split(",")
    if not cluster and len(addresses) > 1:
        msg = f"{where!r} names several hosts: use 'redis+cluster://' for a Redis Cluster"
        raise ConfigurationError(msg)
    nodes = [_host_port(address, url) for address in addresses]
    database = url.path.strip("/")
    if cluster and database not in ("", "0"):
        msg = f"a Redis Cluster has only database 0, not {database!r} ({where!r})"
        raise ConfigurationError(msg)
    if not cluster:
        if not database.isdigit() and database:
            msg = f"the database in {where!r} must be a number, e.g. 'redis://host:6379/0'"
            raise ConfigurationError(msg)
        client_options["db"] = int(database or 0)
    ssl = {name: value for name, value in url.options.items() if name in _SSL_OPTIONS}
    if ssl and not tls:
        msg = f"TLS options in {where!r} need a 'rediss://' URL"
        raise ConfigurationError(msg)
    if tls:
        client_options["ssl"] = True
        client_options.update(ssl)
        if "ssl_check_hostname" in ssl:
            client_options["ssl_check_hostname"] = ssl["ssl_check_hostname"].lower() in ("1", "true", "yes", "on")
    client_options.update(options)
    for name in ("socket_timeout", "socket_connect_timeout"):
        value = client_options[name]
        if not isinstance(value, int | float) or not value > 0:
            msg = f"{name} must be a positive number of seconds, not {value!r} ({where!r})"
            raise ConfigurationError(msg)
    if client_options["decode_responses"]:
        msg = "decode_responses must be False: payloads are bytes"
        raise ConfigurationError(msg)
    if not isinstance(prefix, str):
        msg = f"prefix must be a string, not {prefix!r}"
        raise ConfigurationError(msg)
    return prefix, eviction, _ClientOptions(url, cluster, nodes, client_options)


class RedisStore:
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
        from redis.exceptions import ResponseError

        self._prefix = prefix
        self._errors = _errors()
        self._response_error = ResponseError
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, _Bound] = {}
        self._shared: _Bound | None = None
        self._factory: Callable[[], Client] | None = None
        self._twin: SyncRedisStore | None = None
        _refuse_the_other_api(client, sync=False)
        if isinstance(client, Redis | RedisCluster):
            self._check(client)
            self._shared = _Bound(client)
            self._where = f"<{type(client).__name__}>"
        else:
            self._factory = client
            self._where = repr(client)
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
        prefix, eviction, config = _parse_url(url, options)
        config.check(sync=False)
        return cls(_ClientFactory(config), prefix=prefix, eviction=eviction)

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
        if not isinstance(self._factory, _ClientFactory):
            msg = (
                "RedisStore.sync() needs a store built from a URL; this one uses your own client: make the sync "
                "twin from your sync client, e.g. SyncRedisStore(redis.Redis(...), prefix=...)"
            )
            raise ConfigurationError(msg)
        with self._lock:
            if self._twin is None:
                config = self._factory.config
                config.check(sync=True)
                self._twin = SyncRedisStore(_SyncClientFactory(config), prefix=self._prefix, eviction=self._guard.mode)
            return self._twin

    # -- clients ------------------------------------------------------------------------------------------------

    @staticmethod
    def _check(client: Client) -> None:
        _check_client(client)

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
                client = self._factory()
                self._check(client)
                bound = self._by_loop[loop] = _Bound(client)
        return bound

    def _error(self, operation: str, exc: Exception) -> StoreError:
        return _store_error(self._where, operation, exc)

    # -- the Store protocol -------------------------------------------------------------------------------------

    async def _run(self, op: _Op[_T]) -> _T:
        """Run *op* on the running loop's client; what its reply means."""
        bound = self._bound()
        try:
            if not bound.ready:
                await bound.prepare()
            try:
                reply = await _send(bound.client, bound.scripts, self._prefix, op)
            except self._response_error as exc:
                if not _without_flags(bound.scripts, op, exc, self._where):
                    raise
                reply = await _send(bound.client, bound.scripts, self._prefix, op)
        except self._errors as exc:
            raise self._error(op.name, exc) from exc
        return op.parse(reply)

    async def _admit(self) -> None:
        """Let a claim go ahead, or raise the refusal (see ``._redis_eviction``): check the server's eviction
        policy if it is time to."""
        if not self._guard.due():
            return
        bound = self._bound()
        try:
            if not bound.ready:
                await bound.prepare()
            readings = await _check_async(bound.client, self._where, self._response_error)
        except self._errors as exc:
            raise self._error("claim", exc) from exc
        self._guard.settle(readings)

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`. Refused (:class:`~idempo.StoreError`) while the server may evict
        records, unless the store was made with ``eviction="warn"`` or ``"ignore"``; and when the server is at
        ``maxmemory``. *token*: the new owner's fencing token, if the caller drew it (else the store draws one)."""
        if self._guard.blocks():
            await self._admit()
        return await self._run(_claim(key, fingerprint, lease, ttl, token))

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return await self._run(_renew(key, token, lease))

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return await self._run(_complete(key, token, payload, ttl))

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return await self._run(_release(key, token))

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`. Redis has dropped an expired record already."""
        return await self._run(_get(key))

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return await self._run(_delete(key))

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Always 0: Redis removes expired records on its own."""
        return 0

    async def _scan_request(self, request: _ScanRequest) -> Any:
        bound = self._bound()
        try:
            if not bound.ready:
                await bound.prepare()
            reply = _send_request(bound.client, request)
            return await reply if inspect.isawaitable(reply) else reply
        except self._errors as exc:
            raise self._error("scan", exc) from exc

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. In no particular order: ``SCAN`` walks the keys under the
        store's prefix (on every primary of a cluster), 200 at a time, and each batch of records comes in one
        pipeline. It reads the whole keyspace of the server (``MATCH`` filters what ``SCAN`` walks), a few hundred
        keys per round trip, without blocking the server."""
        return run_plan_async(_scan_plan(self._prefix, prefix, limit), self._scan_request)

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
            raise self._error("close", failure) from failure


class SyncRedisStore:
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
        from redis.exceptions import ResponseError

        self._prefix = prefix
        self._errors = _errors()
        self._response_error = ResponseError
        self._lock = threading.Lock()
        # The client and its scripts, swapped as one (threads read it without the lock).
        self._bound_client: tuple[SyncClient, dict[str, Script]] | None = None
        self._factory: Callable[[], SyncClient] | None = None
        _refuse_the_other_api(client, sync=True)
        if isinstance(client, redis.Redis | redis.RedisCluster):
            _check_client(client)
            self._bound_client = (client, _register(client))
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
        prefix, eviction, config = _parse_url(url, options)
        config.check(sync=True)
        return cls(_SyncClientFactory(config), prefix=prefix, eviction=eviction)

    def __repr__(self) -> str:
        return f"SyncRedisStore({self._where}, prefix={self._prefix!r})"

    def _bound(self) -> tuple[SyncClient, dict[str, Script]]:
        """The client and its scripts, made on first use. (A cluster client connects as it is made: a failure
        to reach the cluster is raised here, and the next operation tries again.)"""
        bound = self._bound_client
        if bound is not None:
            return bound
        assert self._factory is not None
        with self._lock:
            bound = self._bound_client
            if bound is None:
                made = self._factory()
                try:
                    _check_client(made)
                except ConfigurationError:
                    made.close()
                    raise
                bound = self._bound_client = (made, _register(made))
            return bound

    def _error(self, operation: str, exc: Exception) -> StoreError:
        return _store_error(self._where, operation, exc)

    def _run(self, op: _Op[_T]) -> _T:
        """Run *op*; what its reply means."""
        try:
            client, scripts = self._bound()
            try:
                reply = _send(client, scripts, self._prefix, op)
            except self._response_error as exc:
                if not _without_flags(scripts, op, exc, self._where):
                    raise
                reply = _send(client, scripts, self._prefix, op)
        except self._errors as exc:
            raise self._error(op.name, exc) from exc
        return op.parse(reply)

    def _admit(self) -> None:
        """See :meth:`RedisStore._admit`."""
        if not self._guard.due():
            return
        try:
            client, _ = self._bound()
            readings = _check_sync(client, self._where, self._response_error)
        except self._errors as exc:
            raise self._error("claim", exc) from exc
        self._guard.settle(readings)

    # -- the SyncStore protocol ---------------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`RedisStore.claim`."""
        if self._guard.blocks():
            self._admit()
        return self._run(_claim(key, fingerprint, lease, ttl, token))

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return self._run(_renew(key, token, lease))

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return self._run(_complete(key, token, payload, ttl))

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return self._run(_release(key, token))

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`. Redis has dropped an expired record already."""
        return self._run(_get(key))

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return self._run(_delete(key))

    def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`. Always 0: Redis removes expired records on its own."""
        return 0

    def _scan_request(self, request: _ScanRequest) -> Any:
        try:
            client, _ = self._bound()
            return _send_request(client, request)
        except self._errors as exc:
            raise self._error("scan", exc) from exc

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`RedisStore.scan`."""
        return run_plan(_scan_plan(self._prefix, prefix, limit), self._scan_request)

    def close(self) -> None:
        """Close the client the store made. A client you passed in is left open: close it yourself. The store
        makes a new client if it is used again."""
        if not self._owned:
            return
        with self._lock:
            bound, self._bound_client = self._bound_client, None
        if bound is not None:
            try:
                bound[0].close()
            except self._errors as exc:
                raise self._error("close", exc) from exc
