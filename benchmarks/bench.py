"""In-process ASGI benchmark: a trivial FastAPI endpoint, bare and wrapped in ``IdempotencyMiddleware``, per store.

Run it with ``make bench`` (or ``.venv/bin/python benchmarks/bench.py``); ``--quick`` is a smoke run, ``--json PATH``
writes the results, ``--stores memory,sqlite,redis,postgres`` picks the stores (all four by default).

Its parts are shared with ``compare.py`` and ``proxy.py``: ``_apps.py`` (the app, the middleware's options, the
requests), ``_harness.py`` (timing and statistics), ``_servers.py`` (the stores, their servers, the store calls timed
alone) and ``_report.py`` (the tables and the JSON). This file runs them: the checks, the cases, the command line.

Theory of operation: the ASGI application is called directly, with a scope built the way uvicorn builds one, a
``receive`` that hands over the body once and a ``send`` that discards, on one asyncio event loop. No HTTP client
and no web server are involved, so what is measured is the application and the middleware (and, for the network
stores, the store's client library and its round trips to the store's server), nothing else. Cases:

``no-key``
    a POST without an ``Idempotency-Key``: the middleware only looks at the headers and passes it through.
``fresh-key``
    a POST with a new key every time: claim, run the app, record and complete.
``replay``
    the same key again and again: one claim finds the completed record and the stored response is sent; the app
    is not called.
``fresh-key-1k``
    a fresh key with a body of 1 KiB (the others send 58 bytes): what reading and hashing a body adds.
``replay-cached``
    a replay with the middleware's cache of completed responses on (``cache_size``): after the first, no store call.

The floor (issue 17). ``floor.py`` is the least an Idempotency-Key middleware must do (read and hash the body, one
store round trip to claim or read, one to record; NOT safe), on each store's fastest Python client. In the cases
no-key, fresh-key, replay and fresh-key-1k it is a third side of the same blocks: bare, idempo and the floor take
turns, in each of their six orders in turn from one repetition to the next. Its round trips are counted (its
backend's calls) and its answers checked in the same untimed pass as idempo's. A third table puts idempo beside it:
µs per request, the ratios to bare, idempo's ratio to the floor (the median of the repetitions' ratios), and the
verdict against the target of the issue, idempo ≤ 1.15x the floor, on every store and each of these cases.

The WSGI middleware (:mod:`idempo.wsgi`) is timed in the same run, on memory and SQLite, by ``_wsgi.py``: a
trivial Flask endpoint bare and wrapped, called in process with prebuilt environs, cases ``no-key``, ``fresh-key``
and ``replay``, in the same alternating blocks; its table is printed beside the ASGI figures.

A keyed request recorded in the handler's own transaction (:mod:`idempo.transactions`) is timed in the same run too,
on SQLite and PostgreSQL, by ``_transactions.py``: a FastAPI handler that inserts a ledger row in an
``AsyncSession`` transaction, bare, behind the plain middleware, and bound (``record_async`` in its transaction),
the three taking turns in blocks; with the store calls, the handler's statements and, on PostgreSQL, the round trips
and transactions on the wire, counted. Its table is printed after the ASGI figures.

Each case is timed in repetitions of N requests per side (N calibrated per case, see ``Settings``). In a repetition
the bare and the wrapped app (and the floor) take turns in blocks of requests, after one ``gc.collect()``, so that
drift and noise of the machine affect them alike; which side starts rotates between repetitions. Every request is
followed by one turn of the event loop, as in a server. The table shows the medians over the repetitions of µs per
request, and the median of the repetitions' ratios wrapped/bare.

Store round trips are counted in a separate, untimed pass through a counting proxy of the store, so that the proxy's
own cost never shows in the timings. That pass also checks each case answers what it should (200, and
``Idempotent-Replayed: true`` on a replay), so a benchmark of the wrong path (a 409, a 422) cannot go unnoticed.

Network stores. ``redis`` and ``postgres`` run against the servers at ``--redis-url`` and ``--postgres-url``
(by default ``IDEMPO_TEST_REDIS_URL`` and ``IDEMPO_TEST_POSTGRES_URL``, else the local servers ``make services``
starts). A server that does not answer is skipped with a note; under ``CI=true`` or with ``--require-services`` that
is an error instead. A run keeps its records under names of its own, a key prefix ``idempo-bench-<random>:`` and a
table ``idempo_bench_<random>`` (the floor's: ``<prefix>floor:`` and ``idempo_bench_<random>_floor``), so a shared
server is safe; records are kept ``TTL`` seconds, and at the end the run deletes its keys (``SCAN`` + ``UNLINK`` of
its prefix, never a ``FLUSH``) and drops its tables. The floor's PostgreSQL client, asyncpg, is a dev dependency; the
floor is left out (with a note) where its client is missing, and on a Redis Cluster.

Where the time goes. In every repetition, after the cases, the store calls of each case are also timed alone,
straight on the store, without the middleware (fresh key: a claim and a complete of the payload the middleware
stored; replay: a claim of the replay key, which finds its completed record), and so is one bare operation of each
server, through the same client library as the store but on a connection of the bench's own (``PING`` for Redis,
``EXISTS`` of one key on a cluster, a prepared ``SELECT 1`` for PostgreSQL): blocks of calls, the mean per call,
the median over the repetitions, as for the requests. A second table splits a wrapped request into the app (the bare
app's time; it does not run on a replay), the store calls (of which: round trips x the server's bare operation, the
rest being the client library and the store's own code) and the remainder: the middleware itself, plus whatever
the app and the store calls cost more inside a request than alone. That part is not small on a network store: the
process sleeps in every round trip, and the server runs meanwhile, on the same machine, so the code that runs next
finds its caches cold; and a PostgreSQL write waits for its commit to reach the disk, whose time varies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from _apps import KeyFactory, Request, call, make_app, make_requests, wrap
from _harness import (
    FLOOR_CASES,
    CaseResult,
    FloorResult,
    Outcome,
    Probe,
    ServerResult,
    Settings,
    calibrate,
    rotation,
    time_sides,
)
from _report import format_floor, format_split, format_table, to_json
from _servers import (
    DEFAULT_URLS,
    NETWORK_STORES,
    SERVERS,
    CountingBackend,
    CountingStore,
    Server,
    StoreCalls,
    Unavailable,
    floor_client,
    opened,
)
from _transactions import TX_STORES, TxResult, bench_transactions, format_transactions
from _wsgi import WSGI_STORES, bench_wsgi, format_wsgi
from fastapi import FastAPI
from floor import Backend, FloorMiddleware

from idempo import Store
from idempo.asgi import ASGIApp

CASES: Final = ("no-key", "fresh-key", "replay", "fresh-key-1k", "replay-cached")
STORES: Final = ("memory", "sqlite", "redis", "postgres")
CHECK_REQUESTS: Final = 20
IN_CI: Final = os.environ.get("CI", "").lower() in ("1", "true", "yes")

FULL: Final = Settings(reps=11, warmup=300, block=100)
QUICK: Final = Settings(reps=3, warmup=20, block=20, n=40)


@dataclass
class RunOutcome(Outcome):
    """A run's :class:`Outcome`, and the cases of a response recorded in the handler's transaction."""

    transaction_results: list[TxResult] = field(default_factory=list)
    transaction_tables: list[str] = field(default_factory=list)  # made on the PostgreSQL server, and dropped


async def count_round_trips(
    app: FastAPI, store: Store, store_name: str, case: str, keys: KeyFactory
) -> tuple[dict[str, float], CountingStore]:
    """Store calls per request of *case*, through a counting proxy; also check what the case answers. Returns
    the proxy too, with the last calls it saw."""
    counting = CountingStore(store)
    wrapped = wrap(app, counting, case)
    if case == "replay-cached":  # what the cache is for: the replays after the first one this process sees
        await call(wrapped, make_requests(case, store_name, 1, keys)[0])
        counting.reset()
    requests = make_requests(case, store_name, CHECK_REQUESTS, keys)
    await check_answers(app, wrapped, requests, f"{case} on {store_name}", replay=case.startswith("replay"))
    return {method: count / CHECK_REQUESTS for method, count in counting.calls.items()}, counting


async def count_floor_round_trips(
    app: FastAPI, backend: Backend, store_name: str, case: str, keys: KeyFactory
) -> dict[str, float]:
    """The floor's store round trips per request of *case* (its backend's calls, counted), its answers checked
    as idempo's are."""
    counting = CountingBackend(backend)
    floor = FloorMiddleware(app, counting)
    requests = make_requests(case, store_name, CHECK_REQUESTS, keys)
    await check_answers(app, floor, requests, f"the floor's {case} on {store_name}", replay=case.startswith("replay"))
    return {method: count / CHECK_REQUESTS for method, count in counting.calls.items()}


async def check_answers(app: FastAPI, wrapped: ASGIApp, requests: list[Request], what: str, *, replay: bool) -> None:
    """Each of *requests* through *wrapped* answers 200 and the bare app's body, and says it is a replay exactly
    when *replay*; else the benchmark would measure the wrong path (a 409, a 422)."""
    _, _, expected_body = await call(app, make_requests("no-key", "", 1, KeyFactory())[0])
    for request in requests:
        status, headers, body = await call(wrapped, request)
        replayed = headers.get(b"idempotent-replayed") == b"true"
        if status != 200 or body != expected_body or replayed != replay:
            msg = f"{what}: answered {status} {headers!r} {body!r}; the benchmark measures the wrong path"
            raise RuntimeError(msg)


async def bench_store(
    store_name: str,
    store: Store,
    settings: Settings,
    keys: KeyFactory,
    log: Callable[[str], None],
    server: Server | None = None,
    floor_backend: Backend | None = None,
) -> tuple[list[CaseResult], ServerResult | None]:
    app = make_app()
    wrapped = wrap(app, store)
    floor = None if floor_backend is None else FloorMiddleware(app, floor_backend)
    # The replay case needs its response stored first.
    for seeded, label in ((wrapped, "idempo"), *(((floor, "the floor"),) if floor is not None else ())):
        status, _, _ = await call(seeded, make_requests("replay", store_name, 1, keys)[0])
        if status != 200:
            msg = f"seeding the replay key of {label} on {store_name} answered {status}"
            raise RuntimeError(msg)
    results = {case: CaseResult(case, store_name) for case in CASES}
    sides: dict[str, list[ASGIApp]] = {}
    for case in CASES:
        sides[case] = [app, wrapped if case != "replay-cached" else wrap(app, store, case)]
        if floor is not None and floor_backend is not None and case in FLOOR_CASES:
            sides[case].append(floor)
            trips = await count_floor_round_trips(app, floor_backend, store_name, case, keys)
            results[case].floor = FloorResult(round_trips=trips)
    seen: dict[str, CountingStore] = {}
    for case in CASES:
        result = results[case]
        result.round_trips, seen[case] = await count_round_trips(app, store, store_name, case, keys)
        await time_sides(sides[case], case, store_name, settings.warmup, settings.block, keys)
        result.n = settings.n or await calibrate(sides[case], case, store_name, settings, keys)
    fresh, replay = seen["fresh-key"], seen["replay"]
    if fresh.last_claim is None or fresh.last_payload is None or replay.last_claim is None:
        msg = f"the middleware made no claim or no complete on {store_name}"
        raise RuntimeError(msg)
    calls = StoreCalls(store, fresh.last_claim[1], fresh.last_payload, replay.last_claim)
    probes = {"fresh-key": Probe("fresh-key", calls.fresh_key), "replay": Probe("replay", calls.replay)}
    server_probe = None if server is None else Probe(server.op, server.bare_op)
    every_probe = [*probes.values(), *([server_probe] if server_probe else [])]
    # A fresh key with a 1 KiB body makes the same store calls as one with the short body (a fingerprint of the
    # same size, the same response): they are timed once.
    probes["fresh-key-1k"] = probes["fresh-key"]
    for probe in every_probe:
        await probe.calibrate(settings)
    log(
        f"  {store_name}: N per case: "
        + ", ".join(f"{r.case} {r.n}" for r in results.values())
        + "; calls timed alone: "
        + ", ".join(f"{p.label} {p.n}" for p in every_probe)
    )
    for rep in range(settings.reps):
        for result in results.values():
            case_sides = sides[result.case]
            us = await time_sides(
                case_sides,
                result.case,
                store_name,
                result.n,
                settings.block,
                keys,
                order=rotation(len(case_sides), rep),
            )
            result.bare_samples_us.append(us[0])
            result.samples_us.append(us[1])
            if result.floor is not None:
                result.floor.samples_us.append(us[2])
        gc.collect()
        for probe in every_probe:
            await probe.sample()
        log(f"  {store_name}: repetition {rep + 1}/{settings.reps} done")
    server_result = None
    if server is not None and server_probe is not None:
        server_result = ServerResult(
            store_name, server.display, server.op, server.client, server.names(), server_probe.n, server_probe.us
        )
        server_result.samples_us = server_probe.samples_us
    for result in results.values():
        case_probe = probes.get(result.case)
        if case_probe is not None:
            result.store_calls_samples_us = case_probe.samples_us
        result.summarize(server_result)
    return list(results.values()), server_result


def unavailable_note(name: str, reason: str) -> str:
    option = f"--{name}-url"
    variable = f"IDEMPO_TEST_{name.upper()}_URL"
    return (
        f"{name} skipped ({reason}). Start it with 'make services', or point {option} or {variable} at one "
        "(under CI=true or with --require-services this is an error)"
    )


async def run(
    store_names: Sequence[str],
    settings: Settings,
    log: Callable[[str], None],
    urls: Mapping[str, str] | None = None,
    *,
    require_services: bool = False,
) -> RunOutcome:
    """Benchmark each store in turn. Raises :class:`Unavailable` if a server does not answer and
    *require_services*; otherwise that store is skipped."""
    urls = {**DEFAULT_URLS, **(urls or {})}
    keys = KeyFactory()
    outcome = RunOutcome()
    servers: dict[str, Server] = {}
    try:
        for name in store_names:
            if name not in SERVERS:
                continue
            server = SERVERS[name](urls[name])
            try:
                await server.connect()
            except Unavailable as exc:
                if require_services:
                    raise Unavailable(f"{name}: {exc}") from exc
                outcome.skipped[name] = str(exc)
                log(f"  {unavailable_note(name, str(exc))}")
                continue
            servers[name] = server
        with tempfile.TemporaryDirectory(prefix="idempo-bench-") as tmp:
            for name in store_names:
                if name in outcome.skipped:
                    continue
                results, server_result = await bench_one(
                    name, servers.get(name), Path(tmp), settings, keys, log, outcome
                )
                outcome.results.extend(results)
                if server_result is not None:
                    outcome.servers.append(server_result)
                if name in WSGI_STORES:
                    outcome.wsgi_results.extend(bench_wsgi(name, Path(tmp), settings, keys, log))
                if name in TX_STORES:
                    tx_results, tables = await bench_transactions(
                        name, Path(tmp), urls["postgres"], settings, keys, log
                    )
                    outcome.transaction_results.extend(tx_results)
                    outcome.transaction_tables.extend(tables)
    finally:
        for server in servers.values():
            await server.aclose()
    return outcome


async def bench_one(
    name: str,
    server: Server | None,
    tmp: Path,
    settings: Settings,
    keys: KeyFactory,
    log: Callable[[str], None],
    outcome: Outcome,
) -> tuple[list[CaseResult], ServerResult | None]:
    """One store and the floor on it, opened, benchmarked, closed, and what they left on its server removed. The
    floor's client goes in *outcome* (or why it has none there)."""
    async with opened(name, server, tmp) as both:
        if both.floor is None:
            outcome.floor_skipped[name] = both.no_floor
            log(f"  {name}: no floor ({both.no_floor})")
        else:
            outcome.floor_clients[name] = floor_client(name, server)
        results, server_result = await bench_store(name, both.store, settings, keys, log, server, both.floor)
    if server_result is not None:
        server_result.cleanup = both.cleaned
        log(f"  {name}: {both.cleaned}")
    return results, server_result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few iterations only: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument(
        "--stores", default=",".join(STORES), help=f"comma-separated stores to run (default: {','.join(STORES)})"
    )
    parser.add_argument("-n", type=int, help="requests per repetition (overrides the default or --quick)")
    parser.add_argument("--reps", type=int, help="repetitions per case (overrides the default or --quick)")
    for name in NETWORK_STORES:
        parser.add_argument(
            f"--{name}-url",
            default=DEFAULT_URLS[name],
            metavar="URL",
            help=f"the {name} store's URL (default: $IDEMPO_TEST_{name.upper()}_URL or {DEFAULT_URLS[name]})",
        )
    parser.add_argument(
        "--require-services",
        action="store_true",
        default=IN_CI,
        help="fail, rather than skip, when a server does not answer (the default under CI=true)",
    )
    args = parser.parse_args(argv)
    stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown = [name for name in stores if name not in STORES]
    if unknown or not stores:
        parser.error(f"--stores takes a comma-separated list of {', '.join(STORES)}; got {args.stores!r}")
    args.stores = list(dict.fromkeys(stores))
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
    urls = {"redis": args.redis_url, "postgres": args.postgres_url}
    started = time.perf_counter()
    try:
        outcome = asyncio.run(run(args.stores, settings, log, urls, require_services=args.require_services))
    except Unavailable as exc:
        why = "CI=true" if IN_CI else "--require-services"
        print(f"error: {exc} ({why}: a server that does not answer is an error, not a skip)", file=sys.stderr)
        return 2
    wall = time.perf_counter() - started
    if outcome.results:
        print(format_table(outcome.results))
        print(
            f"\nµs/req: median of {settings.reps} repetitions of N requests per side, bare and wrapped (and the "
            f"floor) taking turns in blocks of {settings.block}.\nratio: median of the repetitions' wrapped/bare. "
            f"Targets are reported, never enforced. {wall:.1f} s in all.\n"
        )
        print(format_split(outcome.results, outcome.servers))
        print()
        print(format_floor(outcome))
    if outcome.wsgi_results:
        print()
        print(format_wsgi(outcome.results, outcome.wsgi_results))
    if outcome.transaction_results:
        print()
        print(format_transactions(outcome.results, outcome.transaction_results))
    for name, reason in outcome.skipped.items():
        print(f"note: {unavailable_note(name, reason)}.")
    if args.json is not None:
        data = to_json(outcome, settings, args.quick, wall)
        data["transaction_results"] = [result.to_json() for result in outcome.transaction_results]
        data["transaction_tables"] = outcome.transaction_tables
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
