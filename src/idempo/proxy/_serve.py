"""Running the proxy under uvicorn, in one process or N worker processes. Strictly private.

The command resolves its configuration once, checks it (the store URL opens, the extras are installed), binds the
listening sockets itself (so that a port in use is one clear line, and port 0 gets a port the command can print: the
public one, and the admin one of ``admin_listen`` if set), then hands the sockets to uvicorn: to its server in this
process, or to its supervisor, which starts N workers that each import
:func:`~idempo.proxy._app.app_from_environment` and read the configuration from the environment.

With several workers, metrics go through prometheus_client's multiprocess mode: a fresh temporary directory in
``PROMETHEUS_MULTIPROC_DIR`` (unless one is set already) that every worker writes its values to and reads everyone's
from, removed when the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator

from .._core.errors import ConfigurationError
from ..stores import redact, store_from_url
from ._config import CONFIG_ENV, ProxyConfig, parse_listen, replace

__all__ = ["bind", "check", "serve"]

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def check(config: ProxyConfig) -> None:
    """Fail now, with a clear message, on what would make every worker fail later.

    Raises:
        ConfigurationError: the store URL is invalid.
        MissingDependency: an extra the store, the metrics or the server needs is missing.
    """
    from ..stores import require

    for module in ("uvicorn", "httpx", "prometheus_client"):
        require(module, extra="cli")
    if config.workers > 1 and config.store.partition(":")[0].lower() == "memory":
        msg = (
            f"store {config.store!r} lives inside one process, but there are {config.workers} workers: each would keep "
            "its own records and a retry could run again on another worker; use sqlite:///PATH.db or a network store"
        )
        raise ConfigurationError(msg)
    store = store_from_url(config.store)
    asyncio.run(store.close())


def bind(config: ProxyConfig) -> list[socket.socket]:
    """The listening sockets, bound (``SO_REUSEADDR``, inheritable by the workers): ``listen``'s, then
    ``admin_listen``'s if it is set.

    Raises:
        ConfigurationError: an address is in use, not ours, or not resolvable.
    """
    sockets = [_bind(config.listen)]
    if config.admin_listen:
        try:
            sockets.append(_bind(config.admin_listen))
        except ConfigurationError:
            sockets[0].close()
            raise
    return sockets


def _bind(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        msg = f"cannot listen on {listen}: {exc.strerror}"
        raise ConfigurationError(msg) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            msg = f"cannot listen on {listen}: the address is already in use (another process has the port)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            msg = f"cannot listen on {listen}: permission denied (ports below 1024 need privileges)"
        else:
            msg = f"cannot listen on {listen}: {exc.strerror or exc}"
        raise ConfigurationError(msg) from None
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    """``HOST:PORT`` of a bound socket (its port, if it was 0, the one it got)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _multiprocess_dir(workers: int) -> Iterator[None]:
    if workers == 1 or os.environ.get(_MULTIPROC_ENV):
        yield
        return
    directory = tempfile.mkdtemp(prefix="idempo-proxy-metrics-")
    os.environ[_MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        del os.environ[_MULTIPROC_ENV]
        shutil.rmtree(directory, ignore_errors=True)


def serve(config: ProxyConfig, sockets: list[socket.socket]) -> None:
    """Serve *config* on *sockets* (from :func:`bind`) until interrupted (SIGINT or SIGTERM)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    admin = ""
    if config.admin_listen:  # the workers tell the admin listener by its port: the one it got, if it was 0
        config = replace(config, admin_listen=_address(sockets[1]))
        admin = f"admin http://{config.admin_listen}{config.prefix}healthz and metrics"
    os.environ[CONFIG_ENV] = config.to_json()
    public = f"http://{_address(sockets[0])}"
    print(
        f"idempo proxy: listening on {public} -> {config.upstream} "
        f"(store {redact(config.store)}, {config.workers} worker{'s' if config.workers > 1 else ''}; "
        f"{admin or f'{config.prefix}healthz, {config.prefix}metrics'})",
        file=sys.stderr,
        flush=True,
    )
    with _multiprocess_dir(config.workers):
        uv_config = uvicorn.Config(
            "idempo.proxy._app:app_from_environment",
            factory=True,
            workers=config.workers,
            lifespan="on",
            ws="none",
            access_log=False,
            log_level=config.log_level,
            server_header=False,
            date_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=10,
        )
        if config.workers > 1:
            Multiprocess(uv_config, sockets=sockets).run()
        else:
            server = uvicorn.Server(uv_config)
            server.run(sockets=sockets)
            if not server.started:
                raise SystemExit(3)
