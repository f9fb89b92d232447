"""The WSGI part of ``bench.py``: a trivial Flask endpoint, bare and wrapped in
:class:`idempo.wsgi.IdempotencyMiddleware` on the sync twin of the memory and the SQLite store, timed as the ASGI
cases are.

Theory of operation: the WSGI callable is called directly, in the benchmark's thread, with an environ built the way
gunicorn builds one (a fresh dict and a fresh ``wsgi.input`` per request, built before the timing starts) and a
``start_response`` that discards; the body is iterated and the iterable closed, as a server does. No HTTP client and
no server: what is measured is Flask and the middleware (and the store). Cases ``no-key``, ``fresh-key`` and
``replay``, as for ASGI; bare and wrapped alternate in blocks, after one ``gc.collect()``, and which side starts
alternates between repetitions. Store calls are counted, and each case's answer checked (200, and
``Idempotent-Replayed: true`` on a replay), in an untimed pass through a counting proxy of the store.

The bare app is a Flask app, as the ASGI bare app is a FastAPI one: a framework's trivial endpoint, so that the ratio
says what the middleware adds to the cheapest request a real service serves. The table also shows the middleware's
own µs (wrapped - bare), which does not depend on the app.
"""

from __future__ import annotations

import gc
import io
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from _apps import BODY, LEASE, PATH, TTL, KeyFactory
from _harness import CaseResult, Settings
from _servers import STORE_METHODS
from flask import Flask

from idempo import Claim, Record
from idempo.stores import SyncStore, sync_store_from_url
from idempo.wsgi import IdempotencyMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

__all__ = ["WSGI_CASES", "WSGI_STORES", "WSGI_TARGETS", "bench_wsgi", "format_wsgi"]

WSGI_CASES: Final = ("no-key", "fresh-key", "replay")
WSGI_STORES: Final = ("memory", "sqlite")
# The target: without a key, within a few percent of bare. Reported, never enforced.
WSGI_TARGETS: Final[dict[tuple[str, str], float]] = {("no-key", "memory"): 1.05, ("no-key", "sqlite"): 1.05}
_CHECK_REQUESTS: Final = 20


def make_wsgi_app() -> Flask:
    """A trivial endpoint: a POST that answers a small JSON document without reading the body."""
    app = Flask("bench")

    @app.post(PATH)
    def create_order() -> dict[str, Any]:
        return {"id": 42, "status": "created"}

    return app


def make_environ(key: str | None) -> WSGIEnvironment:
    """A fresh environ as gunicorn builds it for ``POST /orders`` (the same headers as the ASGI scope)."""
    environ: WSGIEnvironment = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": PATH,
        "QUERY_STRING": "",
        "RAW_URI": PATH,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "51234",
        "HTTP_HOST": "api.example.com",
        "HTTP_USER_AGENT": "python-httpx/0.28.1",
        "HTTP_ACCEPT": "*/*",
        "HTTP_ACCEPT_ENCODING": "gzip, deflate",
        "HTTP_CONNECTION": "keep-alive",
        "HTTP_AUTHORIZATION": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJl",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(BODY),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    if key is not None:
        environ["HTTP_IDEMPOTENCY_KEY"] = key
    return environ


def make_environs(case: str, store: str, count: int, keys: KeyFactory) -> list[WSGIEnvironment]:
    """*count* requests of *case*, built ahead so that building them is never timed."""
    if case == "no-key":
        return [make_environ(None) for _ in range(count)]
    if case == "fresh-key":
        return [make_environ(keys.fresh()) for _ in range(count)]
    return [make_environ(keys.replay(f"wsgi-{store}")) for _ in range(count)]


def _discard(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Callable[[bytes], object]:
    return _write


def _write(data: bytes) -> None:
    """The ``write()`` start_response returns: drops what it is given."""


def time_block(app: WSGIApplication, environs: list[WSGIEnvironment]) -> int:
    """Run the requests one after the other, as a sync worker does: call, iterate the body, close; nanoseconds."""
    start = time.perf_counter_ns()
    for environ in environs:
        result = app(environ, _discard)
        for _ in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return time.perf_counter_ns() - start


def time_pair(
    bare: WSGIApplication,
    wrapped: WSGIApplication,
    case: str,
    store: str,
    n: int,
    block: int,
    keys: KeyFactory,
    *,
    bare_first: bool = True,
) -> tuple[float, float]:
    """One repetition, as ``_harness.time_pair`` for ASGI: *n* requests per side in strictly alternating blocks,
    one short untimed block of each first, after a ``gc.collect()``. Returns µs per request, bare and wrapped."""
    settle = min(block, 10)
    sides = [
        (bare, make_environs(case, store, n, keys), make_environs(case, store, settle, keys)),
        (wrapped, make_environs(case, store, n, keys), make_environs(case, store, settle, keys)),
    ]
    if not bare_first:
        sides.reverse()
    (first, first_environs, first_settle), (second, second_environs, second_settle) = sides
    first_ns = second_ns = 0
    gc.collect()
    time_block(first, first_settle)
    time_block(second, second_settle)
    for at in range(0, n, block):
        first_ns += time_block(first, first_environs[at : at + block])
        second_ns += time_block(second, second_environs[at : at + block])
    bare_ns, wrapped_ns = (first_ns, second_ns) if bare_first else (second_ns, first_ns)
    return bare_ns / n / 1000, wrapped_ns / n / 1000


def calibrate(
    bare: WSGIApplication, wrapped: WSGIApplication, case: str, store: str, settings: Settings, keys: KeyFactory
) -> int:
    """N such that a repetition of *case* takes about ``settings.budget_ms``, as for ASGI."""
    bare_us, wrapped_us = time_pair(bare, wrapped, case, store, settings.block, settings.block, keys)
    n = int(settings.budget_ms * 1000 / (bare_us + wrapped_us)) // settings.block * settings.block
    return max(2 * settings.block, min(settings.max_n, n))


class CountingSyncStore:
    """A :class:`~idempo.SyncStore` that forwards to another and counts the calls of each method."""

    def __init__(self, inner: SyncStore) -> None:
        self.inner = inner
        self.calls: dict[str, int] = dict.fromkeys(STORE_METHODS, 0)

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self.calls["claim"] += 1
        return self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        self.calls["renew"] += 1
        return self.inner.renew(key, token, lease=lease)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self.calls["complete"] += 1
        return self.inner.complete(key, token, payload, ttl=ttl)

    def release(self, key: str, token: str) -> bool:
        self.calls["release"] += 1
        return self.inner.release(key, token)

    def get(self, key: str) -> Record | None:
        self.calls["get"] += 1
        return self.inner.get(key)

    def delete(self, key: str) -> bool:
        self.calls["delete"] += 1
        return self.inner.delete(key)

    def purge_expired(self) -> int:
        self.calls["purge_expired"] += 1
        return self.inner.purge_expired()

    def close(self) -> None:
        self.inner.close()


def wrap(app: WSGIApplication, store: SyncStore) -> IdempotencyMiddleware:
    """*app* in the WSGI middleware on *store*, with the ASGI benchmark's ttl and lease."""
    return IdempotencyMiddleware(app, store=store, ttl=TTL, lease=LEASE)


def _call(app: WSGIApplication, environ: WSGIEnvironment) -> tuple[str, dict[str, str], bytes]:
    seen: list[tuple[str, dict[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Callable[..., object]:
        seen.append((status, {name.lower(): value for name, value in headers}))
        return _write

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen[-1][0], seen[-1][1], body


def count_round_trips(
    app: WSGIApplication, store: SyncStore, name: str, case: str, keys: KeyFactory
) -> dict[str, float]:
    """Store calls per request of *case*, through a counting proxy; also check what the case answers."""
    counting = CountingSyncStore(store)
    wrapped = wrap(app, counting)
    counting.calls = dict.fromkeys(STORE_METHODS, 0)  # not the start-up check
    _, _, expected = _call(app, make_environ(None))
    for environ in make_environs(case, name, _CHECK_REQUESTS, keys):
        status, headers, body = _call(wrapped, environ)
        replayed = headers.get("idempotent-replayed") == "true"
        if not status.startswith("200") or body != expected or replayed != (case == "replay"):
            msg = (
                f"WSGI {case} on {name}: answered {status} {headers!r} {body!r}; the benchmark measures the wrong path"
            )
            raise RuntimeError(msg)
    return {method: count / _CHECK_REQUESTS for method, count in counting.calls.items()}


def bench_wsgi(
    name: str, tmp: Path, settings: Settings, keys: KeyFactory, log: Callable[[str], None]
) -> list[CaseResult]:
    """The WSGI cases on the sync store *name* (``memory`` or ``sqlite``, a file of its own in *tmp*)."""
    store = sync_store_from_url("memory://" if name == "memory" else f"sqlite:///{tmp / 'wsgi.db'}")
    try:
        bare: WSGIApplication = make_wsgi_app()
        wrapped = wrap(bare, store)
        seeded, _, _ = _call(wrapped, make_environs("replay", name, 1, keys)[0])
        if not seeded.startswith("200"):
            msg = f"seeding the WSGI replay key on {name} answered {seeded}"
            raise RuntimeError(msg)
        results = {case: CaseResult(case, name) for case in WSGI_CASES}
        for case, result in results.items():
            result.round_trips = count_round_trips(bare, store, name, case, keys)
            time_pair(bare, wrapped, case, name, settings.warmup, settings.block, keys)
            result.n = settings.n or calibrate(bare, wrapped, case, name, settings, keys)
        log(f"  wsgi {name}: N per case: " + ", ".join(f"{r.case} {r.n}" for r in results.values()))
        for rep in range(settings.reps):
            for result in results.values():
                bare_us, wrapped_us = time_pair(
                    bare, wrapped, result.case, name, result.n, settings.block, keys, bare_first=rep % 2 == 0
                )
                result.bare_samples_us.append(bare_us)
                result.samples_us.append(wrapped_us)
            log(f"  wsgi {name}: repetition {rep + 1}/{settings.reps} done")
        for result in results.values():
            result.summarize(None, WSGI_TARGETS)
        return list(results.values())
    finally:
        store.close()


def format_wsgi(asgi: Iterable[CaseResult], wsgi: Iterable[CaseResult]) -> str:
    """The WSGI cases beside the ASGI ones of the same run: µs per request, bare, ratio, and the middleware's own µs."""
    by_asgi = {(r.case, r.store): r for r in asgi}
    header = (
        f"{'case':<10} {'store':<7} │ {'ASGI µs':>8} {'bare':>7} {'ratio':>6} {'+µs':>6} │ "
        f"{'WSGI µs':>8} {'bare':>7} {'ratio':>6} {'+µs':>6} {'target':>7} {'':<4} store calls/req"
    )
    lines = [
        "WSGI (a Flask endpoint, called in process; the sync store twins) beside ASGI (FastAPI), same run. "
        "+µs: wrapped - bare.",
        header,
        "-" * len(header),
    ]
    for w in wsgi:
        a = by_asgi.get((w.case, w.store))
        asgi_part = (
            f"{a.us_per_request:>8.1f} {a.bare_us_per_request:>7.1f} {a.ratio:>5.2f}x "
            f"{a.us_per_request - a.bare_us_per_request:>6.1f}"
            if a is not None
            else f"{'-':>8} {'-':>7} {'-':>6} {'-':>6}"
        )
        trips = " ".join(f"{method}={count:g}" for method, count in w.round_trips.items() if count) or "none"
        target = f"≤{w.target:g}x" if w.target is not None else "-"
        lines.append(
            f"{w.case:<10} {w.store:<7} │ {asgi_part} │ {w.us_per_request:>8.1f} {w.bare_us_per_request:>7.1f} "
            f"{w.ratio:>5.2f}x {w.us_per_request - w.bare_us_per_request:>6.1f} {target:>7} {w.verdict:<4} {trips}"
        )
    return "\n".join(lines)
