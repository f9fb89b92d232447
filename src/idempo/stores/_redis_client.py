"""The Redis stores' clients: what a URL asks for, the clients made from it (sync or asyncio, one server or a
cluster), the checks of a client of the user's own, and what redis-py's failures become. Strictly private (see
``redis.py``'s docstring).

redis-py is imported only where it is needed, so that a missing extra is reported by the store that needs it
(:func:`~idempo.stores.require`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import unquote

from .._core.errors import ConfigurationError, StoreError, StoreFullError
from ._redis_eviction import DEFAULT_EVICTION, Eviction, check_mode
from ._url import StoreURL, redact

if TYPE_CHECKING:
    import redis
    import redis.cluster
    from redis.asyncio import Redis, RedisCluster

    Client: TypeAlias = Redis | RedisCluster
    SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster

__all__ = [
    "DEFAULT_PREFIX",
    "ClientFactory",
    "ClientOptions",
    "SyncClientFactory",
    "check_client",
    "errors",
    "parse_url",
    "refuse_the_other_api",
    "store_error",
]

_T = TypeVar("_T")

DEFAULT_PREFIX = "idempo:"
DEFAULT_TIMEOUT = 2.0
DEFAULT_CONNECT_TIMEOUT = 1.0
_DEFAULT_PORT = 6379
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


def check_client(client: Any) -> None:
    """Refuse a client (sync or async) that decodes responses: payloads are bytes."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        decodes = bool(pool.connection_kwargs.get("decode_responses"))
    else:
        decodes = client.get_encoder().decode_responses
    if decodes:
        msg = "the Redis client must be made with decode_responses=False: payloads are bytes"
        raise ConfigurationError(msg)


def refuse_the_other_api(client: object, *, sync: bool) -> None:
    """A sync client given to :class:`RedisStore`, or an asyncio one to :class:`SyncRedisStore`, fails at once."""
    import redis
    import redis.asyncio

    if sync and isinstance(client, redis.asyncio.Redis | redis.asyncio.RedisCluster):
        msg = f"{type(client).__name__} is redis-py's asyncio client: use RedisStore, or redis-py's sync client"
        raise ConfigurationError(msg)
    if not sync and isinstance(client, redis.Redis | redis.RedisCluster):
        msg = f"{type(client).__name__} is redis-py's sync client: use SyncRedisStore, or redis.asyncio's client"
        raise ConfigurationError(msg)


def store_error(where: str, operation: str, exc: Exception) -> StoreError:
    """The error a store raises for redis-py's *exc*: :class:`~idempo.StoreFullError` when the server refused a
    write at ``maxmemory`` (a smaller one may still land), else :class:`~idempo.StoreError`."""
    from redis.exceptions import OutOfMemoryError

    kind = StoreFullError if isinstance(exc, OutOfMemoryError) else StoreError
    return kind(f"Redis store {where}: {operation} failed: {type(exc).__name__}: {exc}")


@cache
def errors() -> tuple[type[Exception], ...]:
    """What redis-py raises on a failure. OSError covers the builtin TimeoutError (asyncio's) and socket errors
    redis-py lets through."""
    from redis.exceptions import RedisClusterException, RedisError

    return (RedisError, RedisClusterException, OSError)


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


class ClientOptions:
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

    @property
    def reply_timeout(self) -> float | None:
        """Seconds the asyncio store itself lets one command on one server take (see :meth:`async_client`);
        ``None`` for a cluster, whose client keeps ``socket_timeout``."""
        return None if self.cluster else float(self.options["socket_timeout"])

    def async_client(self) -> Client:
        """An asyncio client. On one server it is made without ``socket_timeout``, and the store bounds each
        command to :attr:`reply_timeout` seconds itself (``._redis_timeouts``): with one, redis-py's asyncio
        connection runs every command's write in ``asyncio.wait_for`` (a task and two more turns of the event loop
        per command) and its read under a timeout of its own. A cluster client keeps it: redis-py acts on a node's
        timeout (it refreshes its view of the cluster, then tries again)."""
        from redis.asyncio import Redis, RedisCluster
        from redis.asyncio.cluster import ClusterNode
        from redis.asyncio.retry import Retry

        options = {"retry": _retry(Retry), **self.options}
        if self.cluster:
            return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self.nodes], **options)
        ((host, port),) = self.nodes
        options["socket_timeout"] = None
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


class ClientFactory:
    """Makes an async client from a URL's options. Strictly private."""

    __slots__ = ("config",)

    def __init__(self, config: ClientOptions) -> None:
        self.config = config

    def __repr__(self) -> str:
        return repr(self.config)

    def __call__(self) -> Client:
        return self.config.async_client()


class SyncClientFactory:
    """Makes a sync client from a URL's options. Strictly private."""

    __slots__ = ("config",)

    def __init__(self, config: ClientOptions) -> None:
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


def parse_url(url: StoreURL, options: dict[str, Any]) -> tuple[str, Eviction, ClientOptions]:
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
    return prefix, eviction, ClientOptions(url, cluster, nodes, client_options)
