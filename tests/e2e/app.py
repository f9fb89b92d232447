"""The application the end-to-end tests serve with ``uvicorn --workers 4 --factory tests.e2e.app:create_app``.

Configured by environment variables (read in each worker process, when uvicorn calls :func:`create_app`):

- ``IDEMPO_E2E_STORE``: the URL of the store every worker shares (``redis://...``, ``postgresql://...``); if it is
  not set, ``IDEMPO_E2E_DB``: absolute path of the SQLite file every worker shares (``sqlite:////<path>``).
- ``IDEMPO_E2E_DIR``: the side-effect directory the test and the workers share.
- ``IDEMPO_E2E_LEASE``: the lease of the middleware, in seconds (default 30).
- ``IDEMPO_E2E_SHORT_LEASE``: the lease of the middleware that serves paths under ``/short/`` (default 2).

What the workers leave in ``IDEMPO_E2E_DIR``, so that the test can see across processes what happened:

- ``ready-<pid>``: that worker has started (written at lifespan startup).
- ``<tag>.arrivals``: one line ``<pid>`` per request carrying ``X-E2E-Tag: <tag>``, appended by the worker that
  accepted it *before* the idempotency middleware sees the request.
- ``<name>.events``: ``start <pid>`` when ``POST /charge/<name>`` (the operation) begins and ``done <pid>`` when it
  finishes. Lines are appended with one ``write`` on an ``O_APPEND`` descriptor, which is atomic for lines this short.

``POST /charge/<name>`` holds (does not finish) while the file ``<name>.hold`` exists: that is how a test keeps the
first execution in progress while the other requests arrive, and releases it. Every response carries
``X-Worker-Pid``, added outside the idempotency middleware, so that 409s and replays say which worker answered.
Paths under ``/wait/`` go through a middleware with ``on_conflict="wait"``; paths under ``/short/`` through one with
``on_conflict="reject"`` and the short lease; all others through one with ``on_conflict="reject"`` and the lease.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from idempo import IdempotencyMiddleware, store_from_url
from idempo.asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = ["create_app"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
_HOLD_LIMIT = 60.0  # an operation never holds longer than this, so that no worker hangs if a test forgets
_POLL = 0.01


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def _tag(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-e2e-tag":
            tag = bytes(value).decode("latin-1")
            return tag if _NAME.fullmatch(tag) else None
    return None


class _Observe:
    """Outermost layer: record arrivals of tagged requests, and stamp every response with the worker's pid."""

    def __init__(self, app: ASGIApp, side_dir: Path) -> None:
        self.app = app
        self.side_dir = side_dir
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tag = _tag(scope)
        if tag is not None:
            _append(self.side_dir / f"{tag}.arrivals", str(os.getpid()))

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", self.pid)]}
            await send(message)

        await self.app(scope, receive, send_with_pid)


class _Dispatch:
    """``/wait/...`` to the waiting middleware, ``/short/...`` to the one with the short lease, every other HTTP
    request, and the lifespan, to the rejecting one."""

    def __init__(self, inner: ASGIApp, reject: ASGIApp, wait: ASGIApp, short: ASGIApp) -> None:
        self.inner = inner
        self.reject = reject
        self.wait = wait
        self.short = short

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.reject(scope, receive, send)  # whose shutdown waits for what it is still recording
        elif scope["type"] != "http":
            await self.inner(scope, receive, send)
        elif scope["path"].startswith("/wait/"):
            await self.wait(scope, receive, send)
        elif scope["path"].startswith("/short/"):
            await self.short(scope, receive, send)
        else:
            await self.reject(scope, receive, send)


def create_app() -> ASGIApp:
    """Build the application from the environment (see the module's docstring)."""
    side_dir = Path(os.environ["IDEMPO_E2E_DIR"])
    url = os.environ.get("IDEMPO_E2E_STORE") or f"sqlite:///{os.environ['IDEMPO_E2E_DB']}"
    lease = float(os.environ.get("IDEMPO_E2E_LEASE", "30"))
    short_lease = float(os.environ.get("IDEMPO_E2E_SHORT_LEASE", "2"))
    store = store_from_url(url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        (side_dir / f"ready-{os.getpid()}").touch()
        yield
        await store.close()

    api = FastAPI(lifespan=lifespan)

    @api.get("/health")
    async def health() -> dict[str, int]:
        return {"pid": os.getpid()}

    async def charge(name: str, request: Request) -> JSONResponse:
        if not _NAME.fullmatch(name):
            return JSONResponse({"detail": "bad name"}, status_code=404)
        events = side_dir / f"{name}.events"
        hold = side_dir / f"{name}.hold"
        _append(events, f"start {os.getpid()}")
        deadline = time.monotonic() + _HOLD_LIMIT
        while hold.exists() and time.monotonic() < deadline:  # noqa: ASYNC110 - released by another process
            await asyncio.sleep(_POLL)
        body = await request.body()
        _append(events, f"done {os.getpid()}")
        return JSONResponse(
            {
                "charge_id": uuid.uuid4().hex,
                "pid": os.getpid(),
                "key": request.state.idempotency_key,
                "request_body": body.decode(),
            },
            status_code=200,
        )

    api.add_api_route("/charge/{name}", charge, methods=["POST"])
    api.add_api_route("/wait/charge/{name}", charge, methods=["POST"])
    api.add_api_route("/short/charge/{name}", charge, methods=["POST"])

    # The lifespan goes through this one (start-up not checked: a worker restarted during a store outage starts).
    reject = IdempotencyMiddleware(api, store=store, lease=lease, on_conflict="reject", startup_check="off")
    wait = IdempotencyMiddleware(api, store=store, lease=lease, on_conflict="wait", wait_timeout=20)
    short = IdempotencyMiddleware(api, store=store, lease=short_lease, on_conflict="reject")
    return _Observe(_Dispatch(api, reject, wait, short), side_dir)
