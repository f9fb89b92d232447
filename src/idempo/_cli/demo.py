"""``idempo demo``: a small payments service and a web page, to see double clicks and retries become one charge.

The service (``idempo._demo``) runs under uvicorn on a socket this command binds first, so that a port in use is
a one-line error rather than a server traceback, and ``--port 0`` picks a free port (the URL printed is the real one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import click

_PROBE_KEY = "idempo-demo:probe"


def _require_serving_extra() -> None:
    missing = [name for name in ("uvicorn", "starlette") if _absent(name)]
    if missing:
        names = " and ".join(missing)
        msg = f"the demo needs {names}, from the 'cli' extra: pip install 'idempo[cli]'"
        raise click.ClickException(msg)


def _absent(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


def _probe(store_url: str) -> None:
    """Open the store once and read from it, so that a wrong URL or a server that is down is said now, plainly.

    A probe of its own, closed again: a store's client may belong to the event loop that first used it, and the
    service's store must be made in uvicorn's.
    """
    from idempo import ConfigurationError, StoreError, store_from_url

    try:
        store = store_from_url(store_url)
    except ConfigurationError as exc:  # includes MissingDependency: the message names the extra
        raise click.ClickException(str(exc)) from None

    async def check() -> None:
        try:
            await store.get(_PROBE_KEY)
        finally:
            await store.close()

    try:
        asyncio.run(check())
    except (StoreError, OSError) as exc:
        msg = f"the store does not answer: {exc}"
        raise click.ClickException(msg) from None


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        msg = f"cannot listen on {host!r}: {exc.strerror}"
        raise click.ClickException(msg) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            msg = f"port {port} on {host} is already in use: pick another with --port (or --port 0 for any free one)"
        else:
            msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise click.ClickException(msg) from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


@click.command(name="demo")
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    default=None,
    help="Where idempo keeps its records: sqlite:///path.db, memory://, redis://..., postgresql://... "
    "[default: a fresh SQLite file in a temporary directory, deleted on exit]",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="The port; 0 for any free one."
)
def command(store_url: str | None, host: str, port: int) -> None:
    """Serve a payments demo page: see double clicks and retries turn into one charge.

    The page pays through idempo.js (a fresh Idempotency-Key per payment, retried with the same key) and has
    switches that make the network misbehave: a slow service, a response dropped after the charge is made, a 503
    on the first attempt, a key reused for another amount (422), and idempo turned off, to see the duplicate
    charges it prevents. The charges the service made are listed beside a log of every attempt.

    Runs until Ctrl+C. Charges are kept in memory; the idempotency records in the store.
    """
    _require_serving_extra()
    tmp: Path | None = None
    if store_url is None:
        tmp = Path(tempfile.mkdtemp(prefix="idempo-demo-"))
        store_url = f"sqlite:///{tmp / 'idempo-demo.db'}"
    try:
        _serve(store_url, host, port, temporary=tmp is not None)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _serve(store_url: str, host: str, port: int, *, temporary: bool) -> None:
    import uvicorn

    from idempo._demo import create_app
    from idempo.stores._url import redact

    _probe(store_url)
    sock = _bind(host, port)
    with contextlib.closing(sock):
        where = " (a temporary file, deleted on exit)" if temporary else ""
        click.echo(f"idempo demo: open {_url(host, sock)}")
        click.echo(f"  store: {redact(store_url)}{where}")
        click.echo("  Ctrl+C to stop")
        sys.stdout.flush()
        config = uvicorn.Config(
            create_app(store_url), log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
        )
        # uvicorn shuts down gracefully on Ctrl+C or SIGTERM, then raises the signal again under the handlers that
        # were there before it: make those end the command normally, so that the temporary store is removed.
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except _Stopped:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        click.echo("idempo demo: stopped")


class _Stopped(Exception):
    """Strictly private. Ctrl+C or SIGTERM, after uvicorn has shut down."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped
