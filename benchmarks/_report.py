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


def format_floor(outcome: Outcome) -> str:
    """idempo beside the floor (``floor.py``), per store and case: µs per request, the ratios to the bare app and
    idempo's to the floor, the round trips of each, and the verdict against issue 17's target."""
    rows = [r for r in outcome.results if r.floor is not None]
    header = (
        f"{'case':<13} {'store':<8} {'bare µs':>8} {'idempo µs':>10} {'floor µs':>9} {'idempo/bare':>12} "
        f"{'floor/bare':>11} {'idempo/floor':>13} {'':<5} round trips idempo/floor"
    )
    lines = [
        "Beside the floor (benchmarks/floor.py: per keyed request, the body hashed, one store round trip to claim or",
        "read and one to record; NOT safe), timed in the same blocks as the bare app and idempo, taking turns:",
        header,
        "-" * len(header),
    ]
    misses: list[str] = []
    for r in rows:
        floor = r.floor
        assert floor is not None
        trips = f"{sum(r.round_trips.values()):g}/{sum(floor.round_trips.values()):g}"
        lines.append(
            f"{r.case:<13} {r.store:<8} {r.bare_us_per_request:>8.1f} {r.us_per_request:>10.1f} "
            f"{floor.us_per_request:>9.1f} {r.ratio:>11.2f}x {floor.ratio:>10.2f}x {floor.idempo_ratio:>12.2f}x "
            f"{floor.verdict:<5} {trips}"
        )
        if floor.verdict != "PASS":
            misses.append(f"{r.case} on {r.store} {floor.idempo_ratio:.2f}x")
    if rows:
        target = rows[0].floor.target if rows[0].floor is not None else 0.0
        if misses:
            lines.append(
                f"Target idempo ≤ {target:g}x the floor: MISS ({len(misses)} of {len(rows)}: {', '.join(misses)})"
            )
        else:
            lines.append(f"Target idempo ≤ {target:g}x the floor: PASS (all {len(rows)})")
    for store, client in outcome.floor_clients.items():
        lines.append(f"floor on {store}: {client}.")
    for store, reason in outcome.floor_skipped.items():
        lines.append(f"floor on {store}: not run ({reason}).")
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
        "floor": {"clients": outcome.floor_clients, "skipped": outcome.floor_skipped},
        "floor_results": [_floor_row(r) for r in outcome.results if r.floor is not None],
    }


def _floor_row(r: CaseResult) -> dict[str, Any]:
    """The floor on one case of one store, beside idempo's figures of the same blocks."""
    floor = r.floor
    assert floor is not None
    return {
        "case": r.case,
        "store": r.store,
        "n": r.n,
        "us_per_request": floor.us_per_request,
        "samples_us": floor.samples_us,
        "ratio": floor.ratio,  # the floor / bare
        "ratios": [f / b for f, b in zip(floor.samples_us, r.bare_samples_us, strict=True)],
        "round_trips": floor.round_trips,
        "idempo_us_per_request": r.us_per_request,
        "idempo_ratio": floor.idempo_ratio,  # idempo / the floor
        "idempo_ratios": floor.idempo_ratios,
        "target": floor.target,
        "verdict": floor.verdict,
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
