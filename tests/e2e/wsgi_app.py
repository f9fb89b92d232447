"""The WSGI application the gunicorn tests serve (``tests.e2e.wsgi_app:create_app()``): a plain WSGI callable behind
:class:`idempo.wsgi.IdempotencyMiddleware`, whose keyed ``POST /orders/<name>`` writes one row to a business
database, so that "exactly once" is counted where a real service would count it.

Configured by environment variables, read in each worker when gunicorn calls :func:`create_app`:

- ``WSGI_E2E_STORE``: the URL of the store every worker shares (``sqlite:///...``, ``redis://...``, ...).
- ``WSGI_E2E_DB``: the business database, a SQLite file (WAL mode) every worker writes to: table ``orders``
  (``id``, ``name``, ``idem_key``, ``pid``).
- ``WSGI_E2E_DIR``: a directory the test and the workers share: gates, and what started.
- ``WSGI_E2E_LEASE``: the lease of the middlewares, in seconds (default 30).
- ``WSGI_E2E_SHORT_LEASE``: the lease of the middleware of the paths under ``/short/`` (default 2).

Every response carries ``X-Worker-Pid``, and every request with ``X-E2E-Tag: <tag>`` appends the worker's pid to
``<tag>.arrivals`` in the shared directory, both outside the middleware (so 409s and replays say where they came
from, and the test sees which workers hold a waiting request). Routes:

- ``GET /health``: 200, never keyed.
- ``POST /orders/<name>`` (``on_conflict="reject"``), ``POST /wait/orders/<name>`` (``on_conflict="wait"``),
  ``POST /short/orders/<name>`` (reject, the short lease): append ``<pid>`` to ``<name>.started`` in the shared
  directory; then, while the file ``<name>.hold`` exists there, block (the gate: the test holds a request inside
  the app and releases it by deleting the file; never longer than a minute); then insert one row and answer
  ``201`` with ``{"order_id", "pid", "key", "body"}``.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from idempo.stores import sync_store_from_url
from idempo.wsgi import KEY_ENVIRON, IdempotencyMiddleware, StartResponse, WSGIApplication, WSGIEnvironment
from tests.support.locks import one_process_at_a_time

if TYPE_CHECKING:
    from _typeshed import OptExcInfo

__all__ = ["count_rows", "create_app"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
_ORDER = re.compile(r"/(?:wait/|short/)?orders/([A-Za-z0-9_-]{1,100})")
_HOLD_LIMIT = 60.0  # a gate never holds longer, so that no worker hangs if a test forgets it
_POLL = 0.01


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")  # one short write on O_APPEND: atomic between processes
    finally:
        os.close(fd)


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, timeout=30, isolation_level=None)


def _create_database(db: Path) -> None:
    with one_process_at_a_time(db.with_name(db.name + ".create-lock")):
        conn = _connect(db)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, name TEXT NOT NULL, idem_key TEXT, "
                "pid INTEGER NOT NULL)"
            )
        finally:
            conn.close()


def count_rows(db: Path, name: str) -> int:
    """How many orders named *name* the business database holds (the test's count of executions)."""
    conn = _connect(db)
    try:
        (count,) = conn.execute("SELECT count(*) FROM orders WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    return int(count)


def _json(start_response: StartResponse, status: str, document: object) -> list[bytes]:
    body = json.dumps(document).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _business(db: Path, side_dir: Path) -> WSGIApplication:
    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        if path == "/health" and method == "GET":
            return _json(start_response, "200 OK", {"pid": os.getpid()})
        matched = _ORDER.fullmatch(path)
        if matched is None or method != "POST":
            return _json(start_response, "404 Not Found", {"detail": "no such route"})
        name = matched.group(1)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        _append(side_dir / f"{name}.started", str(os.getpid()))
        hold = side_dir / f"{name}.hold"
        deadline = time.monotonic() + _HOLD_LIMIT
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(_POLL)  # released by the test, another process: there is nothing to wait on but the file
        key = environ.get(KEY_ENVIRON)
        conn = _connect(db)
        try:
            cursor = conn.execute("INSERT INTO orders (name, idem_key, pid) VALUES (?, ?, ?)", (name, key, os.getpid()))
            order_id = cursor.lastrowid
        finally:
            conn.close()
        document = {"order_id": order_id, "pid": os.getpid(), "key": key, "body": body.decode()}
        return _json(start_response, "201 Created", document)

    return application


def _observe(inner: WSGIApplication, side_dir: Path) -> WSGIApplication:
    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        pid = str(os.getpid())  # per request: with --preload, the app is built in gunicorn's master
        tag = environ.get("HTTP_X_E2E_TAG", "")
        if _NAME.fullmatch(tag):
            _append(side_dir / f"{tag}.arrivals", pid)

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            return start_response(status, [*headers, ("X-Worker-Pid", pid)], exc_info)

        return inner(environ, start)

    return application


def create_app() -> WSGIApplication:
    """Build the application from the environment (see the module's docstring)."""
    db = Path(os.environ["WSGI_E2E_DB"])
    side_dir = Path(os.environ["WSGI_E2E_DIR"])
    store = sync_store_from_url(os.environ["WSGI_E2E_STORE"])  # one per worker, shared by its three middlewares
    lease = float(os.environ.get("WSGI_E2E_LEASE", "30"))
    short_lease = float(os.environ.get("WSGI_E2E_SHORT_LEASE", "2"))
    _create_database(db)
    business = _business(db, side_dir)
    reject = IdempotencyMiddleware(business, store=store, lease=lease, on_conflict="reject")
    wait = IdempotencyMiddleware(business, store=store, lease=lease, on_conflict="wait", wait_timeout=20)
    short = IdempotencyMiddleware(business, store=store, lease=short_lease, on_conflict="reject")

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if path.startswith("/wait/"):
            return wait(environ, start_response)
        if path.startswith("/short/"):
            return short(environ, start_response)
        return reject(environ, start_response)

    return _observe(dispatch, side_dir)
