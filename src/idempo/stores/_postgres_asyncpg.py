"""The async PostgreSQL store's client, asyncpg: where to connect, how, and how a statement is run. Strictly private
(see ``postgres.py``'s docstring).

Why asyncpg for the async store (and psycopg for the sync one): the same claim, prepared, costs the process about
100k instructions through asyncpg and 280k through psycopg's ``AsyncConnection`` (callgrind), half the CPU time per
statement; psycopg stays for the blocking store, which asyncpg has no form of.

Connection strings. The store takes libpq's (a URL or ``key=value`` pairs, with libpq's environment variables), as
the sync store does, and parses it with psycopg. asyncpg takes libpq's parameters as a URL's query: ``host``, ``port``,
``dbname``, ``user``, ``password``, ``passfile``, ``service``, the ``ssl*`` ones, ``target_session_attrs``,
``krbsrvname``, ``gsslib``; the server's own (``options``, ``application_name``) go in the startup message, and so
does ``statement_timeout``. A libpq parameter that only tunes TCP or TLS (``keepalives``, ``tcp_user_timeout``,
``sslsni``...) is ignored, and so is ``gssencmode`` or ``channel_binding`` but for ``require``; any other asyncpg has
no form of (``gssencmode=require``, ``requirepeer``, ``replication``...) is a :class:`~idempo.ConfigurationError` when
the store is made, rather than ignored.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]

from .._core.errors import ConfigurationError
from ._postgres_pool import Pool, Pooled, PoolTimeout

__all__ = ["FAILURES", "ConnectTimeoutError", "asyncpg_dsn", "connect", "count_of", "disown", "has_input", "kill"]

FAILURES: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, PoolTimeout, OSError)
"""asyncpg's errors (the server's, and the client's: a connection closed, a protocol error), the pool's, and what
the socket layer or a timeout (``TimeoutError``, an ``OSError``) may raise."""


class ConnectTimeoutError(ConnectionError):
    """A connection was not made within ``connect_timeout`` (as libpq says it: "connection timeout expired")."""


# libpq's parameters that asyncpg reads in a URL's query as libpq does.
_CLIENT: Final = frozenset(
    {
        "host",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
    }
)
# The server's own, sent in the startup message as libpq sends them.
_SERVER: Final = frozenset({"options"})
# Taken care of by the store (its connect_timeout and application_name), or tuning only (of TCP, of TLS): ignored.
_IGNORED: Final = frozenset(
    {
        "connect_timeout",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "sslcompression",
        "sslsni",
        "load_balance_hosts",
    }
)
# Fine but for these values (a requirement asyncpg cannot meet): asyncpg never encrypts with GSSAPI nor binds the
# channel, and always speaks UTF-8.
_UNLESS: Final = {"gssencmode": ("require",), "channel_binding": ("require",), "client_encoding": None}


def asyncpg_dsn(params: Mapping[str, Any], display: str) -> str:
    """The URL asyncpg connects with, from a libpq connection string's parameters (*display*: the string without its
    password, for the message if asyncpg cannot take one of them)."""
    params = {name: str(value) for name, value in params.items() if value is not None and value != ""}
    if "hostaddr" in params and "host" not in params:
        params["host"] = params.pop("hostaddr")  # libpq's address without a name lookup: as a host, here
    unsupported = []
    for name, value in params.items():
        if name in _CLIENT or name in _SERVER or name in _IGNORED:
            continue
        if name in _UNLESS:
            refused = _UNLESS[name]
            if refused is None and value.lower().replace("-", "") == "utf8":
                continue
            if refused is not None and value not in refused:
                continue
            unsupported.append(f"{name}={value}")
        else:
            unsupported.append(name)
    if unsupported:
        msg = (
            f"PostgreSQL store {display!r}: the async store's client (asyncpg) cannot take the libpq parameter(s) "
            f"{', '.join(unsupported)}; remove them (the sync store, on psycopg, takes every libpq parameter)"
        )
        raise ConfigurationError(msg)
    query = {name: value for name, value in params.items() if name in _CLIENT or name in _SERVER}
    return "postgresql://" + (f"?{urllib.parse.urlencode(query)}" if query else "")


async def connect(
    dsn: str, *, connect_timeout: float, server_settings: dict[str, str], prepare: bool, lifetime: float
) -> Pooled:
    """A new connection, as the pool keeps it, to be closed *lifetime* seconds from now."""
    try:
        conn = await asyncpg.connect(
            dsn, timeout=connect_timeout, server_settings=server_settings, statement_cache_size=100 if prepare else 0
        )
    except TimeoutError as exc:
        msg = f"connection timeout expired ({connect_timeout:g} s)"
        raise ConnectTimeoutError(msg) from exc
    # asyncpg has no public way to its socket; the transport's is the one the connection reads.
    fd = conn._transport.get_extra_info("socket").fileno()
    return Pooled(conn, fd, time.monotonic() + lifetime)


def has_input(pooled: Pooled) -> bool:
    """Whether an idle connection is closed, or its socket readable (the server closed it, or sent a notice the event
    loop has not read yet). No round trip."""
    return pooled.conn.is_closed() or pooled.poller()


def kill(pooled: Pooled) -> None:
    """Close *pooled*'s socket at once: the pending read fails (``ConnectionDoesNotExistError``), and the pool throws
    the connection away."""
    pooled.conn.terminate()


def count_of(status: str) -> int:
    """The row count of a command's status (``UPDATE 1``, ``DELETE 3``), or -1 if it has none (``CREATE TABLE``)."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else -1


def disown(pool: Pool) -> None:
    """In a forked child, for the connections of a pool inherited from the parent: never let them be closed from
    here. Closing one (asyncpg does, when a connection it thinks open is collected) would take its socket out of
    the event loop's epoll set, which parent and child share, so the parent would no longer hear from it."""
    for pooled in pool.connections():
        pooled.conn._aborted = True
