"""The report of a run (see ``bench.py``'s docstring): the table of the cases, the split of a wrapped request's time,
and the JSON output."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

from _apps import LEASE, TTL
from _harness import CaseResult, Outcome, ServerResult, Settings


def format_table(results: Sequence[CaseResult]) -> str:
    def trips(result: CaseResult) -> str:
        shown = [f"{method}={count:g}" for method, count in result.round_trips.items() if count]
        return " ".join(shown) or "none"

    header = (
        f"{'case':<13} {'store':<8} {'N':>5} {'µs/req':>8} {'bare µs':>8} {'ratio':>6} {'target':>7} {'':<5} "
        "store calls/req"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        target = f"≤{r.target:g}x" if r.target is not None else "-"
        lines.append(
            f"{r.case:<13} {r.store:<8} {r.n:>5} {r.us_per_request:>8.1f} {r.bare_us_per_request:>8.1f} "
            f"{r.ratio:>5.2f}x {target:>7} {r.verdict:<5} {trips(r)}"
        )
    return "\n".join(lines)


def format_split(results: Sequence[CaseResult], servers: Sequence[ServerResult]) -> str:
    """Where a wrapped request's time goes, and each server's bare operation."""
    header = (
        f"{'case':<13} {'store':<8} {'wrapped':>8} {'app':>8} {'store calls':>12} {'of which server':>16} "
        f"{'remainder':>10}"
    )
    lines = [
        "Where the time goes, µs per wrapped request: the app (the bare app's time; not run on a replay), the store",
        "calls timed alone (of which the server: round trips x its bare operation; the rest of them is the client",
        "library and the store's code), and the remainder: the middleware, plus what the app and the store calls cost",
        "more inside a request than alone (cold caches after each wait for the server; PostgreSQL's commit flushes).",
        header,
        "-" * len(header),
    ]
    by_store = {server.store: server for server in servers}
    for r in results:
        server = by_store.get(r.store)
        if r.server_ops_us is None or server is None or not r.server_ops_us:
            of_server = "-"
        else:
            of_server = f"{sum(r.round_trips.values()):g}x{server.us_per_op:.0f}={r.server_ops_us:.1f}"
        lines.append(
            f"{r.case:<13} {r.store:<8} {r.us_per_request:>8.1f} {r.app_us:>8.1f} {r.store_calls_us:>12.1f} "
            f"{of_server:>16} {r.remainder_us:>10.1f}"
        )
    for server in servers:
        lines.append(
            f"{server.store}: bare {server.op} {server.us_per_op:.1f} µs ({server.client}, a connection of its own to "
            f"{server.url}); {server.cleanup}."
        )
    return "\n".join(lines)


def to_json(outcome: Outcome, settings: Settings, quick: bool, wall_s: float) -> dict[str, Any]:
    return {
        "settings": {
            "n": settings.n,
            "budget_ms": settings.budget_ms,
            "max_n": settings.max_n,
            "reps": settings.reps,
            "warmup": settings.warmup,
            "block": settings.block,
            "quick": quick,
            "ttl": TTL,
            "lease": LEASE,
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
        "skipped": outcome.skipped,
        "servers": {
            s.store: {
                "url": s.url,
                "client": s.client,
                "op": s.op,
                "n": s.n,
                "us_per_op": s.us_per_op,
                "samples_us": s.samples_us,
                "cleanup": s.cleanup,
                **s.names,
            }
            for s in outcome.servers
        },
        "results": [_row(r) for r in outcome.results],
        "wsgi_results": [_row(r) for r in outcome.wsgi_results],
    }


def _row(r: CaseResult) -> dict[str, Any]:
    """One case on one store, as the JSON keeps it."""
    return {
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
        "split_us": {
            "app": r.app_us,
            "store_calls": r.store_calls_us,
            "server_ops": r.server_ops_us,
            "remainder": r.remainder_us,
        },
        "store_calls_samples_us": r.store_calls_samples_us,
    }
