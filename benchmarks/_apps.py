"""The application and the middleware under test, and the requests they get (see ``bench.py``'s docstring): a
trivial FastAPI endpoint, ``IdempotencyMiddleware`` as the benchmarks configure it, scopes as uvicorn builds them.
Shared by ``bench.py``, ``compare.py`` and ``proxy.py`` (which sends the same body to the same path over HTTP)."""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI

from idempo import IdempotencyMiddleware, Store
from idempo.asgi import ASGIApp, Message, Receive, Scope

BODY: Final = b'{"item":"widget","quantity":3,"note":"leave at the door"}'
# The fresh-key-1k case: a JSON document of exactly 1 KiB, the same order with a longer note.
_ORDER_1K: Final = b'{"item":"widget","quantity":3,"note":"%s"}'
BODY_1K: Final = _ORDER_1K % (b"leave at the door; " * 60)[: 1024 - len(_ORDER_1K % b"")]
PATH: Final = "/orders"
# The middleware's ttl and lease, on every store. A short ttl: a network store's records go away on their own too.
TTL: Final = 600.0
LEASE: Final = 30.0
CACHE_SIZE: Final = 1000  # the replay-cached case: the middleware keeps completed responses in this process


# -- the application --------------------------------------------------------------------------------------------


def make_app() -> FastAPI:
    """A trivial endpoint: a POST that answers a small JSON document without reading the body."""
    app = FastAPI()

    @app.post(PATH)
    async def create_order() -> dict[str, Any]:
        return {"id": 42, "status": "created"}

    return app


# -- requests ---------------------------------------------------------------------------------------------------

_BASE_HEADERS: Final[list[tuple[bytes, bytes]]] = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"python-httpx/0.28.1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJl"),
    (b"content-type", b"application/json"),
]


def make_scope(key: str | None, body: bytes = BODY) -> Scope:
    """A fresh scope as uvicorn builds it for ``POST /orders`` with *body* (apps and middleware write into the
    scope, so every request gets its own)."""
    headers = [*_BASE_HEADERS, (b"content-length", str(len(body)).encode("ascii"))]
    if key is not None:
        headers.append((b"idempotency-key", key.encode("ascii")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode("ascii"),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


def receive_once(body: bytes) -> Receive:
    """A ``receive`` that hands over *body* in one message, then reports a disconnect."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def discard(message: Message) -> None:
    """A ``send`` that drops every message."""


Request = tuple[Scope, Receive]


class KeyFactory:
    """Keys that are never used twice in one run, plus one fixed key per store for the replay case."""

    def __init__(self) -> None:
        self._next = 0

    def fresh(self) -> str:
        self._next += 1
        return f"bench-{self._next:08d}"

    @staticmethod
    def replay(store: str) -> str:
        return f"bench-replay-{store}"


def make_requests(case: str, store: str, count: int, keys: KeyFactory) -> list[Request]:
    """*count* requests of *case*, built ahead so that building them is never timed. ``fresh-key-1k`` is a fresh key
    with a body of 1 KiB (:data:`BODY_1K`); every other case sends :data:`BODY`."""
    body = BODY_1K if case == "fresh-key-1k" else BODY
    requests: list[Request] = []
    for _ in range(count):
        if case == "no-key":
            key = None
        elif case.startswith("fresh-key"):
            key = keys.fresh()
        else:
            key = keys.replay(store)
        requests.append((make_scope(key, body), receive_once(body)))
    return requests


# -- calling ---------------------------------------------------------------------------------------------------


class Recorder:
    """A ``send`` that keeps the messages of one response, for the checks."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        start = self.messages[0]
        body = b"".join(m.get("body", b"") for m in self.messages[1:])
        return start["status"], dict(start["headers"]), body


async def call(app: ASGIApp, request: Request) -> tuple[int, dict[bytes, bytes], bytes]:
    """*request* through *app*: the status, the headers and the body of its answer."""
    recorder = Recorder()
    scope, receive = request
    await app(scope, receive, recorder)
    return recorder.response()


def wrap(app: ASGIApp, store: Store, case: str = "") -> IdempotencyMiddleware:
    """*app* in the middleware on *store*, as every benchmark runs it; with a cache for ``replay-cached``."""
    cache_size = CACHE_SIZE if case == "replay-cached" else 0
    return IdempotencyMiddleware(app, store=store, ttl=TTL, lease=LEASE, cache_size=cache_size)
