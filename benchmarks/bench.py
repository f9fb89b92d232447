"""In-process ASGI benchmark: a trivial FastAPI endpoint, bare and wrapped in ``IdempotencyMiddleware``.

Run it with ``make bench`` (or ``.venv/bin/python benchmarks/bench.py``); ``--quick`` is a smoke run, ``--json PATH``
writes the results, ``--stores memory,sqlite`` picks the stores.

Theory of operation: the ASGI application is called directly, with a scope built the way uvicorn builds one, a
``receive`` that hands over the body once and a ``send`` that discards, on one asyncio event loop. No HTTP client
and no server are involved, so what is measured is the application and the middleware, nothing else. Cases:

``no-key``
    a POST without an ``Idempotency-Key``: the middleware only looks at the headers and passes it through.
``fresh-key``
    a POST with a new key every time: claim, run the app, record and complete.
``replay``
    the same key again and again: one claim finds the completed record and the stored response is sent; the app
    is not called.

Each case is timed in repetitions of N requests per side (N calibrated per case, see ``Settings``). In a repetition
the bare and the wrapped app take turns in blocks of requests, after one ``gc.collect()``, so that drift and noise of
the machine affect both alike; which side starts alternates between repetitions. Every request is followed by one
turn of the event loop, as in a server. The table shows the medians over the repetitions of µs per request, and the
median of the repetitions' ratios wrapped/bare.

Store round trips are counted in a separate, untimed pass through a counting proxy of the store, so that the proxy's
own cost never shows in the timings. That pass also checks each case answers what it should (200, and
``Idempotent-Replayed: true`` on a replay), so a benchmark of the wrong path (a 409, a 422) cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI

import idempo
from idempo import IdempotencyMiddleware, MemoryStore, SQLiteStore, Store
from idempo.asgi import ASGIApp, Message, Receive, Scope

CASES: Final = ("no-key", "fresh-key", "replay")
STORES: Final = ("memory", "sqlite")
STORE_METHODS: Final = ("claim", "complete", "release", "renew", "get", "delete", "purge_expired")
# The targets of the issue, as the most a wrapped request may cost relative to the bare app. Report only.
TARGETS: Final[dict[tuple[str, str], float]] = {
    ("no-key", "memory"): 1.05,
    ("no-key", "sqlite"): 1.05,
    ("fresh-key", "memory"): 1.3,
    ("fresh-key", "sqlite"): 5.0,
    ("replay", "memory"): 0.3,
}

BODY: Final = b'{"item":"widget","quantity":3,"note":"leave at the door"}'
PATH: Final = "/orders"
CHECK_REQUESTS: Final = 20


@dataclass(frozen=True)
class Settings:
    """How much to run.

    Each case gets *reps* repetitions of N requests per side. N is *n* if given; otherwise it is chosen per case
    from a timed calibration block so that one repetition (both sides) takes about *budget_ms*, between two blocks
    and *max_n*: a SQLite fresh key costs ten times a replay, and this keeps both well sampled and the whole run
    near 20-30 s. *warmup* requests per side go first; requests are timed in blocks of *block*.
    """

    reps: int
    warmup: int
    block: int
    n: int | None = None
    budget_ms: float = 300.0
    max_n: int = 3000


FULL: Final = Settings(reps=11, warmup=300, block=100)
QUICK: Final = Settings(reps=3, warmup=20, block=20, n=40)


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
    (b"content-length", str(len(BODY)).encode("ascii")),
]


def make_scope(key: str | None) -> Scope:
    """A fresh scope as uvicorn builds it for ``POST /orders`` (apps and middleware write into the scope, so
    every request gets its own)."""
    headers = list(_BASE_HEADERS)
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
    """*count* requests of *case*, built ahead so that building them is never timed."""
    requests: list[Request] = []
    for _ in range(count):
        if case == "no-key":
            key = None
        elif case == "fresh-key":
            key = keys.fresh()
        else:
            key = keys.replay(store)
        requests.append((make_scope(key), receive_once(BODY)))
    return requests


# -- a counting store -------------------------------------------------------------------------------------------


class CountingStore:
    """A :class:`~idempo.Store` that forwards to another and counts the calls of each method."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: dict[str, int] = dict.fromkeys(STORE_METHODS, 0)

    def reset(self) -> None:
        self.calls = dict.fromkeys(STORE_METHODS, 0)

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> idempo.Claim:
        self.calls["claim"] += 1
        return await self.inner.claim(key, fingerprint, lease=lease, ttl=ttl)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self.calls["renew"] += 1
        return await self.inner.renew(key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self.calls["complete"] += 1
        return await self.inner.complete(key, token, payload, ttl=ttl)

    async def release(self, key: str, token: str) -> bool:
        self.calls["release"] += 1
        return await self.inner.release(key, token)

    async def get(self, key: str) -> idempo.Record | None:
        self.calls["get"] += 1
        return await self.inner.get(key)

    async def delete(self, key: str) -> bool:
        self.calls["delete"] += 1
        return await self.inner.delete(key)

    async def purge_expired(self) -> int:
        self.calls["purge_expired"] += 1
        return await self.inner.purge_expired()

    async def close(self) -> None:
        await self.inner.close()


# -- measuring --------------------------------------------------------------------------------------------------


async def time_block(app: ASGIApp, requests: Sequence[Request]) -> int:
    """Run *requests* one after the other, with one turn of the event loop after each, as a server has (it is
    also when the loop drops cancelled timers); return the nanoseconds it took."""
    start = time.perf_counter_ns()
    for scope, receive in requests:
        await app(scope, receive, discard)
        await asyncio.sleep(0)
    return time.perf_counter_ns() - start


def blocks(requests: list[Request], size: int) -> list[list[Request]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


async def time_pair(
    bare: ASGIApp,
    wrapped: ASGIApp,
    case: str,
    store: str,
    n: int,
    block: int,
    keys: KeyFactory,
    *,
    bare_first: bool = True,
) -> tuple[float, float]:
    """One repetition: *n* requests through each app, in blocks that strictly alternate between the two, so that
    both see the same noise and every block follows one of the other side (a block right after one of its own
    side runs warmer). One short untimed block of each goes first, after the ``gc.collect()``, so that neither
    pays for the cold start alone. Returns µs per request, bare and wrapped."""
    settle = min(block, 10)
    bare_blocks = blocks(make_requests(case, store, n, keys), block)
    wrapped_blocks = blocks(make_requests(case, store, n, keys), block)
    settling = [make_requests(case, store, settle, keys) for _ in range(2)]
    sides = [(bare, bare_blocks, settling[0]), (wrapped, wrapped_blocks, settling[1])]
    if not bare_first:
        sides.reverse()
    (first, first_blocks, first_settle), (second, second_blocks, second_settle) = sides
    first_ns = second_ns = 0
    gc.collect()
    await time_block(first, first_settle)
    await time_block(second, second_settle)
    for first_requests, second_requests in zip(first_blocks, second_blocks, strict=True):
        first_ns += await time_block(first, first_requests)
        second_ns += await time_block(second, second_requests)
    bare_ns, wrapped_ns = (first_ns, second_ns) if bare_first else (second_ns, first_ns)
    return bare_ns / n / 1000, wrapped_ns / n / 1000


@dataclass
class CaseResult:
    """What one case on one store measured."""

    case: str
    store: str
    n: int = 0
    us_per_request: float = 0.0
    bare_us_per_request: float = 0.0
    ratio: float = 0.0
    target: float | None = None
    verdict: str = "-"
    round_trips: dict[str, float] = field(default_factory=dict)
    samples_us: list[float] = field(default_factory=list)
    bare_samples_us: list[float] = field(default_factory=list)

    def summarize(self) -> None:
        """Medians; the ratio is the median of the repetitions' ratios (each one of a bare and a wrapped run
        that saw the same noise), which is steadier than a ratio of medians on a busy machine."""
        self.us_per_request = statistics.median(self.samples_us)
        self.bare_us_per_request = statistics.median(self.bare_samples_us)
        self.ratio = statistics.median(w / b for w, b in zip(self.samples_us, self.bare_samples_us, strict=True))
        self.target = TARGETS.get((self.case, self.store))
        if self.target is not None:
            self.verdict = "PASS" if self.ratio <= self.target else "MISS"


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
    recorder = Recorder()
    scope, receive = request
    await app(scope, receive, recorder)
    return recorder.response()


async def count_round_trips(
    app: FastAPI, store: Store, store_name: str, case: str, keys: KeyFactory
) -> dict[str, float]:
    """Store calls per request of *case*, through a counting proxy; also check what the case answers."""
    counting = CountingStore(store)
    wrapped = IdempotencyMiddleware(app, store=counting)
    requests = make_requests(case, store_name, CHECK_REQUESTS, keys)
    _, _, expected_body = await call(app, make_requests("no-key", store_name, 1, keys)[0])
    for request in requests:
        status, headers, body = await call(wrapped, request)
        replayed = headers.get(b"idempotent-replayed") == b"true"
        if status != 200 or body != expected_body or replayed != (case == "replay"):
            msg = (
                f"{case} on {store_name}: answered {status} {headers!r} {body!r}; the benchmark measures the wrong path"
            )
            raise RuntimeError(msg)
    return {method: count / CHECK_REQUESTS for method, count in counting.calls.items()}


async def bench_store(
    store_name: str, store: Store, settings: Settings, keys: KeyFactory, log: Callable[[str], None]
) -> list[CaseResult]:
    app = make_app()
    wrapped = IdempotencyMiddleware(app, store=store)
    # The replay case needs its response stored first.
    status, _, _ = await call(wrapped, make_requests("replay", store_name, 1, keys)[0])
    if status != 200:
        msg = f"seeding the replay key on {store_name} answered {status}"
        raise RuntimeError(msg)
    results = {case: CaseResult(case, store_name) for case in CASES}
    for case in CASES:
        result = results[case]
        result.round_trips = await count_round_trips(app, store, store_name, case, keys)
        await time_pair(app, wrapped, case, store_name, settings.warmup, settings.block, keys)
        result.n = settings.n or await calibrate(app, wrapped, case, store_name, settings, keys)
    log(f"  {store_name}: N per case: " + ", ".join(f"{r.case} {r.n}" for r in results.values()))
    for rep in range(settings.reps):
        for result in results.values():
            bare_us, wrapped_us = await time_pair(
                app, wrapped, result.case, store_name, result.n, settings.block, keys, bare_first=rep % 2 == 0
            )
            result.bare_samples_us.append(bare_us)
            result.samples_us.append(wrapped_us)
        log(f"  {store_name}: repetition {rep + 1}/{settings.reps} done")
    for result in results.values():
        result.summarize()
    return list(results.values())


async def calibrate(
    bare: ASGIApp, wrapped: ASGIApp, case: str, store: str, settings: Settings, keys: KeyFactory
) -> int:
    """N such that a repetition of *case* (N requests per side) takes about ``settings.budget_ms``."""
    bare_us, wrapped_us = await time_pair(bare, wrapped, case, store, settings.block, settings.block, keys)
    n = int(settings.budget_ms * 1000 / (bare_us + wrapped_us)) // settings.block * settings.block
    return max(2 * settings.block, min(settings.max_n, n))


async def run(store_names: Sequence[str], settings: Settings, log: Callable[[str], None]) -> list[CaseResult]:
    keys = KeyFactory()
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="idempo-bench-") as tmp:
        for name in store_names:
            store: Store = MemoryStore() if name == "memory" else SQLiteStore(Path(tmp) / "bench.db")
            try:
                results.extend(await bench_store(name, store, settings, keys, log))
            finally:
                await store.close()
    return results


# -- reporting --------------------------------------------------------------------------------------------------


def format_table(results: Sequence[CaseResult]) -> str:
    def trips(result: CaseResult) -> str:
        shown = [f"{method}={count:g}" for method, count in result.round_trips.items() if count]
        return " ".join(shown) or "none"

    header = (
        f"{'case':<10} {'store':<7} {'N':>5} {'µs/req':>8} {'bare µs':>8} {'ratio':>6} {'target':>7} {'':<5} "
        "store calls/req"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        target = f"≤{r.target:g}x" if r.target is not None else "-"
        lines.append(
            f"{r.case:<10} {r.store:<7} {r.n:>5} {r.us_per_request:>8.1f} {r.bare_us_per_request:>8.1f} "
            f"{r.ratio:>5.2f}x {target:>7} {r.verdict:<5} {trips(r)}"
        )
    return "\n".join(lines)


def to_json(results: Sequence[CaseResult], settings: Settings, quick: bool, wall_s: float) -> dict[str, Any]:
    return {
        "settings": {
            "n": settings.n,
            "budget_ms": settings.budget_ms,
            "max_n": settings.max_n,
            "reps": settings.reps,
            "warmup": settings.warmup,
            "block": settings.block,
            "quick": quick,
        },
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "event_loop": "asyncio (default), one loop turn per request",
            "gc": "enabled; gc.collect() before every repetition",
        },
        "wall_seconds": round(wall_s, 2),
        "results": [
            {
                "case": r.case,
                "store": r.store,
                "n": r.n,
                "us_per_request": r.us_per_request,
                "bare_us_per_request": r.bare_us_per_request,
                "ratio": r.ratio,
                "ratios": [w / b for w, b in zip(r.samples_us, r.bare_samples_us, strict=True)],
                "target": r.target,
                "verdict": r.verdict,
                "round_trips": r.round_trips,
                "samples_us": r.samples_us,
                "bare_samples_us": r.bare_samples_us,
            }
            for r in results
        ],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few iterations only: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument(
        "--stores", default=",".join(STORES), help=f"comma-separated stores to run (default: {','.join(STORES)})"
    )
    parser.add_argument("-n", type=int, help="requests per repetition (overrides the default or --quick)")
    parser.add_argument("--reps", type=int, help="repetitions per case (overrides the default or --quick)")
    args = parser.parse_args(argv)
    stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown = [name for name in stores if name not in STORES]
    if unknown or not stores:
        parser.error(f"--stores takes a comma-separated list of {', '.join(STORES)}; got {args.stores!r}")
    args.stores = stores
    if (args.n is not None and args.n < 1) or (args.reps is not None and args.reps < 1):
        parser.error("-n and --reps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = dataclasses.replace(base, n=args.n or base.n, reps=args.reps or base.reps)
    sizes = f"{settings.n} requests" if settings.n else f"about {settings.budget_ms:g} ms"

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(
        f"idempo benchmark: {settings.reps} repetitions per case of {sizes} (bare and wrapped); "
        f"stores {', '.join(args.stores)}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    started = time.perf_counter()
    results = asyncio.run(run(args.stores, settings, log))
    wall = time.perf_counter() - started
    print(format_table(results))
    print(
        f"\nµs/req: median of {settings.reps} repetitions of N requests per side, bare and wrapped alternating in "
        f"blocks of {settings.block}.\nratio: median of the repetitions' wrapped/bare. Targets are reported, "
        f"never enforced. {wall:.1f} s in all."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(results, settings, args.quick, wall), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
