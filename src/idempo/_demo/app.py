"""The demo's payments service: a Starlette app behind idempo's middleware, and a layer that misbehaves on request.

Strictly private: what ``idempo demo`` serves. The layers, from the outside in::

    _Faults                 the switches of the page: a 503 on a first attempt, a response dropped after the charge
      IdempotencyMiddleware the subject of the demo, on the store the command was given
        Starlette           GET / (the page), GET /idempo.js, GET|POST /api/charges, GET /api/attempts

The page tells the server which switches are on with each request (``X-Demo-Faults: slow,drop,fail-first``) and
names the submission the request belongs to (``X-Demo-Submission``), so that a one-shot fault hits only the first
attempts of each submission and its retries get through. The server keeps no switch state of its own. Every
response closes its connection (see :func:`_closing` for why).

Charges and the attempts log live in memory: they start empty each time the demo starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from idempo.asgi import ASGIApp, IdempotencyMiddleware, Message, Receive, Scope, Send
from idempo.static import script_source
from idempo.stores import Store

__all__ = ["SLOW_SECONDS", "Ledger", "create_app"]

SLOW_SECONDS: Final = 3.0
"""How long a charge takes with the "slow" switch on: longer than the page's 2-second timeout per attempt."""
_CHARGES_PATH: Final = "/api/charges"
_SUBMISSIONS_KEPT: Final = 1000  # how many submissions' attempt counts are remembered
_PROBLEM: Final = "application/problem+json"


@dataclass(slots=True)
class Ledger:
    """Strictly private. What the service did: the charges it made, and every charge request it saw."""

    charges: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # Submission id -> how many of its requests arrived, for the one-shot faults; oldest forgotten first.
    seen: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def arrival(self, submission: str) -> int:
        """Count one more request of *submission* and return its number, from 1."""
        count = self.seen.pop(submission, 0) + 1
        self.seen[submission] = count
        while len(self.seen) > _SUBMISSIONS_KEPT:
            self.seen.popitem(last=False)
        return count


@dataclass(frozen=True, slots=True)
class _Attempt:
    number: int  # of all charge requests seen, from 1
    submission: str | None
    arrival: int  # of this submission's requests, from 1
    key: str | None
    faults: list[str]
    fault: str | None = None  # the one-shot fault applied to this request
    status: int | None = None  # what the service answered; None when the response was dropped
    replayed: bool = False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class _Faults:
    """Strictly private. The switches of the demo page, as an ASGI layer in front of everything else.

    For ``POST /api/charges`` with ``X-Demo-Faults`` and ``X-Demo-Submission``: the one-shot faults that are on
    (``fail-first``, then ``drop``) are applied to the submission's first requests, one each, in that order:

    - ``fail-first``: answer 503 with ``Retry-After: 1`` before anything runs (no charge).
    - ``drop``: let the request through (the charge is made and idempo records the response), then cut the
      connection instead of sending the response, so that the browser sees a network error.

    (``slow`` is the charge handler's.) Every charge request is logged in the ledger with what it got.
    """

    def __init__(self, app: ASGIApp, ledger: Ledger) -> None:
        self.app = app
        self.ledger = ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        closing = _closing(send)
        if scope["method"] != "POST" or scope["path"] != _CHARGES_PATH:
            await self.app(scope, receive, closing)
            return
        faults = [f.strip() for f in (_header(scope, b"x-demo-faults") or "").split(",") if f.strip()]
        submission = _header(scope, b"x-demo-submission")
        arrival = self.ledger.arrival(submission) if submission else 1
        one_shots = [f for f in ("fail-first", "drop") if f in faults] if submission else []
        fault = one_shots[arrival - 1] if arrival <= len(one_shots) else None
        attempt = asdict(
            _Attempt(
                number=len(self.ledger.attempts) + 1,
                submission=submission,
                arrival=arrival,
                key=_header(scope, b"idempotency-key"),
                faults=faults,
                fault=fault,
            )
        )
        self.ledger.attempts.append(attempt)

        if fault == "fail-first":
            attempt["status"] = 503
            body = json.dumps(
                {
                    "type": "urn:idempo:demo:unavailable",
                    "title": "Service briefly unavailable",
                    "status": 503,
                    "detail": "the demo's 503 switch refused this first attempt; nothing was charged",
                }
            ).encode()
            headers = [(b"content-type", _PROBLEM.encode()), (b"retry-after", b"1")]
            await _send_whole(closing, 503, body, headers)
            return

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                attempt["status"] = message["status"]
                attempt["replayed"] = any(
                    k.lower() == b"idempotent-replayed" and v == b"true" for k, v in message.get("headers", [])
                )
            if fault != "drop":
                await closing(message)

        await self.app(scope, receive, observing_send)
        if fault == "drop":
            attempt["status"] = None
            await _cut_connection(send)


def _closing(send: Send) -> Send:
    """*send*, with ``Connection: close`` added to the response, so that the server closes the connection after it.

    Why: a browser resends a request by itself, without telling the page, when a connection it *reused* closes
    before any answer (Chromium does, even for a POST). Were connections kept alive, the "drop" switch would
    mostly show that silent resend (with the same key, replayed) instead of the network error the page sees and
    retries. Each request on a new connection, the page sees what a lost response looks like.
    """

    async def closing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return closing_send


async def _send_whole(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _cut_connection(send: Send) -> None:
    """Abort the client's connection without a response, as a network that lost it would.

    ASGI has no message for this. Under uvicorn (which is what ``idempo demo`` runs), the ``send`` the server hands
    the outermost app is a method of its per-request cycle, which holds the connection's transport: aborting that
    resets the connection. Anywhere else, raise :class:`ConnectionAbortedError` from the app instead (an in-process
    client such as ``httpx.ASGITransport`` sees it as the request failing).
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort: Callable[[], None] | None = getattr(transport, "abort", None)
    if abort is None:
        msg = "the demo dropped this response (the charge was made)"
        raise ConnectionAbortedError(msg)
    abort()
    # Let the server see the connection go (its connection_lost runs on the next loop iterations), so that it
    # does not complain that the app returned without a response.
    for _ in range(3):
        await asyncio.sleep(0)


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": "urn:idempo:demo:invalid-charge", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type=_PROBLEM,
    )


def _page() -> str:
    return (files("idempo._demo") / "page.html").read_text(encoding="utf-8")


def create_app(store: Store | str, *, ledger: Ledger | None = None, slow_seconds: float = SLOW_SECONDS) -> ASGIApp:
    """The demo service on *store* (a :class:`~idempo.Store` or a store URL). The store is closed at shutdown.

    Args:
        store: where idempo keeps its records.
        ledger: where charges and attempts are kept (a fresh one by default); tests pass their own to look at it.
        slow_seconds: how long a charge takes when the page's "slow" switch is on.
    """
    book = ledger if ledger is not None else Ledger()
    page = _page()
    script = script_source()

    async def index(_: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def idempo_js(_: Request) -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8", headers={"cache-control": "no-store"})

    async def health(_: Request) -> Response:
        return JSONResponse({"ok": True})

    async def list_charges(_: Request) -> Response:
        charges = book.charges
        return JSONResponse(
            {"count": len(charges), "total": sum(c["amount"] for c in charges), "charges": charges},
            headers={"cache-control": "no-store"},
        )

    async def list_attempts(_: Request) -> Response:
        return JSONResponse({"attempts": book.attempts}, headers={"cache-control": "no-store"})

    async def create_charge(request: Request) -> Response:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return _problem(400, "Invalid charge", 'the body must be JSON: {"amount": <cents>}')
        amount = payload.get("amount") if isinstance(payload, dict) else None
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= 100_000_000:
            return _problem(400, "Invalid charge", "amount must be a whole number of cents, from 1 to 100000000")
        if "slow" in (request.headers.get("x-demo-faults") or ""):
            await asyncio.sleep(slow_seconds)  # the demo's "slow" switch: a payment provider taking its time
        charge = {
            "id": f"ch_{len(book.charges) + 1}",
            "amount": amount,
            "currency": "eur",
            "idempotency_key": getattr(request.state, "idempotency_key", None),
            "created": time.time(),
        }
        book.charges.append(charge)
        return JSONResponse(charge, status_code=201)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await middleware.store.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/idempo.js", idempo_js),
            Route("/health", health),
            Route(_CHARGES_PATH, list_charges, methods=["GET"]),
            Route(_CHARGES_PATH, create_charge, methods=["POST"]),
            Route("/api/attempts", list_attempts),
        ],
        lifespan=lifespan,
    )
    middleware = IdempotencyMiddleware(app, store=store, retry_after=1)
    return _Faults(middleware, book)
