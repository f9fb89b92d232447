"""What a keyed request costs: idempo beside other Python idempotency middlewares, and beside reduced middlewares
that each add one of idempo's guarantees to the least a keyed request can do. Run it with ``make bench-compare``.

Theory of operation: the harness ``bench.py`` runs on (``_apps.py``, ``_harness.py``: the same trivial FastAPI
endpoint and middleware options, scopes as uvicorn builds them, one loop turn after each request), with every
contestant in one process. A repetition runs a block of requests through each contestant, in a new random order every
time, and divides its µs per request by the bare app's of the same repetition; the table shows the median of those
ratios. Cases: ``fresh-key`` (a new key each time) and ``replay`` (one key again and again). Each contestant is first
checked to answer 200 to a fresh key and to replay a second request with the same key (its replay header, if it sends
one, is shown).

Contestants, each on its in-memory store:

``idempo``
    :class:`idempo.IdempotencyMiddleware` on :class:`idempo.MemoryStore`.
``floor``, ``+ key, principal, fingerprint``, ``+ keep rules, encoding``, ``+ fenced store``, ``+ state, lease``
    Reduced middlewares, defined here, that are **not safe to use**: the first does only what every keyed request
    must (find the key, read the body, hash it, keep the response in a dict and replay it); each next one adds a
    piece of idempo's work, with idempo's own functions. What is left between the last one and idempo is the rest
    of the contract: request and response size limits, the client that leaves, the outcome recorded before the
    last chunk, 409/422/503 and their problem documents, the app that fails.
others
    The published packages ``fastapi-idempotency-key``, ``asgi-idempotency-header`` and ``fastapi-idempotency``
    (``make bench-compare`` installs them in ``.venv-compare``; any that is not installed is left out), each with
    its own in-memory backend and defaults. Their guarantees differ from idempo's (see the README's table).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import hashlib
import importlib
import importlib.metadata
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _apps import BODY, LEASE, TTL, KeyFactory, make_app, make_requests, make_scope, receive_once, wrap
from _harness import time_block

from idempo import MemoryStore
from idempo._core.codec import decode_parts, encode_app_response
from idempo._core.decide import should_store
from idempo._core.fingerprint import fingerprint_request, principal_digest, scoped_key
from idempo._core.keys import parse_key
from idempo._core.records import Acquired
from idempo.asgi import ASGIApp, Message, Receive, Scope, Send
from idempo.stores.memory import SyncMemoryStore

CASES: Final = ("fresh-key", "replay")
_REPLAYED: Final = (b"idempotent-replayed", b"true")


# -- the reduced middlewares ------------------------------------------------------------------------------------


class Steps:
    """The least a keyed request does, plus the first *level* of idempo's pieces (0 to 4). Not safe to use: there
    are no limits, no conflicts, no mismatches, no failures handled; a second request with the key while the first
    runs gets an empty answer. Only for measuring."""

    LABELS: Final = (
        "floor",
        "+ key, principal, fingerprint",
        "+ keep rules, encoding",
        "+ fenced store",
        "+ state, lease",
    )

    def __init__(self, app: ASGIApp, level: int) -> None:
        self.app = app
        self.level = level
        self.plain: dict[Any, Any] = {}  # levels 0-2: key -> None (running), or the response kept
        self.store = SyncMemoryStore()  # levels 3-4
        self.running: set[object] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        raw = headers.get(b"idempotency-key")
        if raw is None:
            await self.app(scope, receive, send)
            return
        body: bytes = (await receive())["body"]
        level = self.level
        key: Any = raw
        if level >= 1:
            key = scoped_key(principal_digest(headers.get(b"authorization", b"")), parse_key(raw))
            fingerprint = fingerprint_request(scope["method"], scope["path"], scope.get("query_string", b""), body)
        else:
            fingerprint = hashlib.sha256(body).hexdigest()
        token = ""
        if level >= 3:
            claim = self.store.claim(key, fingerprint, lease=LEASE, ttl=TTL)
            if not isinstance(claim, Acquired):
                await self._replay(send, claim.record.payload)
                return
            token = claim.token
        else:
            kept = self.plain.get(key)
            if kept is not None:
                await self._replay(send, kept)
                return
            self.plain[key] = None
        if level >= 4:
            scope["state"]["idempotency_key"] = key
            time.monotonic()
            asyncio.get_running_loop()
            self.running.add(key)
        start: Message = {}
        chunks: list[bytes] = []

        async def app_receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def app_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                if level >= 2:
                    should_store(message["status"])
            else:
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self._record(key, token, start, chunks)
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        finally:
            self.running.discard(key)

    def _record(self, key: Any, token: str, start: Message, chunks: list[bytes]) -> None:
        if self.level < 2:
            self.plain[key] = (start["status"], list(start["headers"]), b"".join(chunks))
            return
        payload = encode_app_response(start["status"], start["headers"], chunks)
        if self.level < 3:
            self.plain[key] = payload
        else:
            self.store.complete(key, token, payload, ttl=TTL)

    @staticmethod
    async def _replay(send: Send, kept: Any) -> None:
        decoded = decode_parts(kept) if isinstance(kept, bytes) else kept
        assert isinstance(decoded, tuple)
        status, headers, body = decoded
        await send({"type": "http.response.start", "status": status, "headers": [*headers, _REPLAYED]})
        await send({"type": "http.response.body", "body": body})


# -- the published packages -------------------------------------------------------------------------------------


def _fastapi_idempotency_key(app: ASGIApp) -> Any:
    module = importlib.import_module("fastapi_idempotency_key.middleware")
    return module.IdempotencyMiddleware(app)


def _asgi_idempotency_header(app: ASGIApp) -> Any:
    middleware = importlib.import_module("idempotency_header_middleware")
    backends = importlib.import_module("idempotency_header_middleware.backends.memory")
    return middleware.IdempotencyHeaderMiddleware(app, backend=backends.MemoryBackend())


def _fastapi_idempotency(app: ASGIApp) -> Any:
    module = importlib.import_module("fastapi_idempotency")
    return module.IdempotencyMiddleware(app)


OTHERS: Final[dict[str, tuple[str, Callable[[ASGIApp], Any]]]] = {
    # label: (distribution, factory)
    "fastapi-idempotency-key": ("fastapi-idempotency-key", _fastapi_idempotency_key),
    "asgi-idempotency-header": ("asgi-idempotency-header", _asgi_idempotency_header),
    "fastapi-idempotency": ("fastapi-idempotency", _fastapi_idempotency),
}


def contestants() -> tuple[dict[str, Callable[[], ASGIApp]], list[str]]:
    """Factories of the wrapped apps (a new app and store for each case), and notes on what was left out."""
    made: dict[str, Callable[[], ASGIApp]] = {"idempo": _idempo}
    for level, label in enumerate(Steps.LABELS):
        made[label] = functools.partial(_steps, level)
    notes = []
    for label, (distribution, factory) in OTHERS.items():
        try:
            factory(make_app())
        except ImportError as exc:
            notes.append(f"{label}: not installed ({exc.name}); pip install {distribution}")
            continue
        made[label] = functools.partial(_other, factory)
    return made, notes


def _idempo() -> ASGIApp:
    return wrap(make_app(), MemoryStore())


def _steps(level: int) -> ASGIApp:
    return Steps(make_app(), level)


def _other(factory: Callable[[ASGIApp], Any]) -> ASGIApp:
    app: ASGIApp = factory(make_app())
    return app


# -- measuring --------------------------------------------------------------------------------------------------


async def check(app: ASGIApp) -> str:
    """A fresh key, then the same key again: the two statuses, and the replay header of the second answer."""
    answers = []
    for _ in range(2):
        messages: list[Message] = []
        await app(make_scope("check-0001"), receive_once(BODY), functools.partial(_keep, messages))
        start = messages[0]
        replayed = [
            f"{name.decode()}: {value.decode()}" for name, value in start["headers"] if b"replayed" in name.lower()
        ]
        answers.append(f"{start['status']}" + (f" ({replayed[0]})" if replayed else ""))
    return ", then ".join(answers)


async def _keep(messages: list[Message], message: Message) -> None:
    messages.append(message)


async def measure(reps: int, n: int) -> None:
    made, notes = contestants()
    print("Checks (fresh key, then the same key):")
    for label, factory in made.items():
        print(f"  {label:32s} {await check(factory())}")
    for note in notes:
        print(f"  left out: {note}")
    bare = make_app()
    results: dict[str, dict[str, float]] = {label: {} for label in made}
    for case in CASES:
        apps: dict[str, ASGIApp] = {"bare": bare, **{label: factory() for label, factory in made.items()}}
        # Each contestant's keys under a name of its own (labels have spaces, keys may not).
        names = {label: f"c{index}" for index, label in enumerate(apps)}
        keys = KeyFactory()
        for label, app in apps.items():  # warm up; on a replay, the first request runs and is kept
            await time_block(app, make_requests("no-key" if label == "bare" else case, names[label], 20, keys))
        ratios: dict[str, list[float]] = {label: [] for label in made}
        order = list(apps)
        for _ in range(reps):
            random.shuffle(order)
            gc.collect()
            us: dict[str, float] = {}
            for label in order:
                requests = make_requests("no-key" if label == "bare" else case, names[label], n, keys)
                us[label] = await time_block(apps[label], requests) / n / 1000
            for label in made:
                ratios[label].append(us[label] / us["bare"])
        for label in made:
            results[label][case] = statistics.median(ratios[label])
        print(f"  {case}: {reps} repetitions done", file=sys.stderr)
    print()
    print(f"{'contestant':32s} " + " ".join(f"{case:>10s}" for case in CASES))
    print("-" * (33 + 11 * len(CASES)))
    for label, by_case in results.items():
        print(f"{label:32s} " + " ".join(f"{by_case[case]:9.2f}x" for case in CASES))
    print()
    print(f"ratio: median over {reps} repetitions of µs per request / the bare app's, {n} requests per block,")
    print("every contestant in a new random order in each repetition.")
    print(f"Python {sys.version.split()[0]}; " + ", ".join(f"{name} {version}" for name, version in _versions()))


def _versions() -> list[tuple[str, str]]:
    found = []
    for name in ("fastapi", "starlette", *(distribution for distribution, _ in OTHERS.values())):
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=60, help="repetitions per case (default 60)")
    parser.add_argument("-n", type=int, default=300, help="requests per block (default 300)")
    args = parser.parse_args()
    asyncio.run(measure(args.reps, args.n))


if __name__ == "__main__":
    main()
