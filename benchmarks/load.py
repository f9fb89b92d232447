"""Under real load: uvicorn (1 and 2 workers) driven by wrk; requests/s of the bare app, idempo and the floor.

Run it with ``make bench-load`` (which installs wrk with ``scripts/wrk`` and starts the servers with
``scripts/services``) or ``.venv/bin/python benchmarks/load.py``; ``--quick`` is a smoke run, ``--json PATH`` and
``--chart PATH`` write the raw results and a PNG chart (matplotlib), ``--markdown`` prints the table as Markdown too,
``--stores sqlite,redis,postgres`` and ``--workers 1,2`` pick what runs. Its parts: ``load_app.py`` (what uvicorn
serves), ``_load_generator.py`` (wrk and its scripts, and the fallback) and ``_load_report.py`` (tables and chart).

Theory of operation. For each store and number of workers, three uvicorn servers run side by side on free ports of
127.0.0.1 (``load_app.py``, one per variant, ``--workers N``, access log off): the trivial FastAPI endpoint bare,
behind idempo's ``IdempotencyMiddleware`` (configured as ``make bench`` configures it), and behind the floor
(``floor.py``: the least an Idempotency-Key middleware must do, one store round trip to claim or read and one to
record, and NOT safe). wrk keeps *connections* keep-alive connections busy (a closed loop: each sends its next
request as soon as its answer is in) for *duration* seconds at a time. Cases, all ``POST /orders`` with a small JSON
body and an ``Authorization`` header (a caller, as in ``make bench``):

``fresh-key``
    a new ``Idempotency-Key`` on every request (wrk's ``request()`` hook: a prefix of the run and round, the wrk
    thread and a counter): claim, run the app, record.
``replay``
    one key, completed before the timing starts, on every request: the stored response is sent, the app not run.

The bare app gets the same requests (it ignores the key). Each variant is warmed up first; then the variants take
turns in rounds (in each round, each case, each variant one timed run; the order of the variants rotates from round
to round, so that none always follows another), and the table shows medians over the rounds: requests/s, and wrk's
50th and 99th percentile latency. The ratios: idempo/bare and floor/bare (of the medians; throughput, below 1:
the cost of the middleware and its store), and **floor/idempo**, the floor's throughput over idempo's, the median of
the rounds' ratios (each of two runs side by side in time): the target of issue 17 is floor/idempo <= 1.15 (PASS,
else MISS). The noise is shown as the spread of the rounds (max-min over the median).

Checks. Before a server is timed, a few requests check it takes the path it should: two fresh keys each run the app
(201 and two bodies), a replay answers the stored body (201, ``Idempotent-Replayed: true`` from idempo and the
floor). Every timed run must have no errors (wrk counts answers that are not 2xx or 3xx, and socket errors and
timeouts): a run that measured 409s or 422s fails the benchmark.

Stores. SQLite: two files in a temporary directory, one per middleware. Redis and PostgreSQL: the servers at
``--redis-url`` and ``--postgres-url`` (``IDEMPO_TEST_REDIS_URL``, ``IDEMPO_TEST_POSTGRES_URL``, else the local
servers ``make services`` starts), under names of the run's own (a key prefix ``idempo-load-<random>:``, tables
``idempo_load_<random>`` and ``idempo_load_<random>_floor``), removed at the end (``SCAN`` + ``UNLINK``, never a
``FLUSH``; ``DROP TABLE``). A server that does not answer is skipped, with a note.

The load generator, the servers' workers, and Redis or PostgreSQL share the machine's cores: these are figures for
comparing the variants with each other in one run, not capacity figures. Without wrk (``scripts/wrk`` installs it),
``--generator python`` (chosen automatically) drives the servers from this process with asyncio, the same requests
on as many connections; it costs more CPU than wrk, which the servers then do not get, and says so in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from _apps import BODY, PATH
from _load_generator import AUTHORIZATION, Generator, Run, wrk_version
from _load_report import CASES, STORES, TARGET, VARIANTS, chart, markdown, report
from _servers import DEFAULT_URLS, PostgresServer, RedisServer, Server, Unavailable, free_port

from idempo.stores import parse_store_url
from idempo.stores.postgres import _strip_options

HERE: Final = Path(__file__).resolve()
STARTUP_DEADLINE: Final = 30.0


@dataclass(frozen=True)
class Settings:
    duration: int  # seconds of one timed run (wrk takes whole seconds)
    warmup: int  # seconds of untimed load per variant and case, before the rounds
    rounds: int
    connections: int
    threads: int  # wrk's


FULL: Final = Settings(duration=5, warmup=2, rounds=5, connections=32, threads=1)
QUICK: Final = Settings(duration=1, warmup=1, rounds=1, connections=8, threads=1)


# -- the servers ------------------------------------------------------------------------------------------------------


def with_query(url: str, **options: str) -> str:
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query), *options.items()])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class Stores:
    """Where one store's variants keep their records in this run, and the clean-up."""

    def __init__(self, store: str, url: str | None, work: Path, tag: str) -> None:
        self.store = store
        self.server: Server | None = None
        self.env: dict[str, dict[str, str]] = {"bare": {}}
        self.names: dict[str, str] = {}  # where the records are, for the JSON
        if store == "sqlite":
            self.names = {"idempo": "idempo.db", "floor": "floor.db"}
            self.env["idempo"] = {"IDEMPO_LOAD_STORE": f"sqlite:///{work / 'idempo.db'}"}
            self.env["floor"] = {"IDEMPO_FLOOR_STORE": "sqlite", "IDEMPO_FLOOR_URL": str(work / "floor.db")}
        elif store == "redis":
            assert url is not None
            redis = RedisServer(url)
            redis.prefix = f"idempo-load-{tag}:"  # both variants' keys under it: one SCAN removes them
            self.server = redis
            self.names = {"idempo": f"{redis.prefix}idempo:*", "floor": f"{redis.prefix}floor:*"}
            self.env["idempo"] = {"IDEMPO_LOAD_STORE": with_query(url, prefix=f"{redis.prefix}idempo:")}
            parts = urlsplit(url)  # redis-py's URL: without idempo's options
            query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("prefix", "eviction")])
            floor_url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
            self.env["floor"] = {"IDEMPO_FLOOR_STORE": "redis", "IDEMPO_FLOOR_URL": floor_url}
            self.env["floor"]["IDEMPO_FLOOR_PREFIX"] = f"{redis.prefix}floor:"
        else:
            assert url is not None
            postgres = PostgresServer(url)  # drops both tables at the end
            postgres.table, postgres.floor_table = f"idempo_load_{tag}", f"idempo_load_{tag}_floor"
            self.server = postgres
            self.names = {"idempo": postgres.table, "floor": postgres.floor_table}
            self.env["idempo"] = {"IDEMPO_LOAD_STORE": with_query(url, table=postgres.table)}
            floor_url = _strip_options(parse_store_url(url))  # the libpq URL idempo's store connects to
            self.env["floor"] = {"IDEMPO_FLOOR_STORE": "postgres", "IDEMPO_FLOOR_URL": floor_url}
            self.env["floor"]["IDEMPO_FLOOR_TABLE"] = postgres.floor_table

    def check(self) -> None:
        """Raises :class:`Unavailable` if the server does not answer."""
        if self.server is not None:
            asyncio.run(_connect_and_close(self.server))

    def cleanup(self) -> list[str]:
        return [asyncio.run(_cleanup(self.server))] if self.server is not None else []


async def _connect_and_close(server: Server) -> None:
    await server.connect()
    await server.aclose()


async def _cleanup(server: Server) -> str:
    try:
        await server.connect()
    except Unavailable as exc:
        return f"not cleaned up: {exc}"
    try:
        return await server.cleanup()
    finally:
        await server.aclose()


class Uvicorn:
    """One variant's uvicorn, ``--workers N``, in a process group of its own."""

    def __init__(self, variant: str, workers: int, env: dict[str, str], work: Path) -> None:
        self.variant = variant
        self.port = free_port()
        self.ready = work / f"ready-{variant}-{workers}"
        self.ready.mkdir()
        self.log = work / f"uvicorn-{variant}-{workers}.log"
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE.parent), "--factory", "load_app:create_app"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        command += ["--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "2"]
        path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, **env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        environment |= {"IDEMPO_LOAD_VARIANT": variant, "IDEMPO_LOAD_READY_DIR": str(self.ready)}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=work, env=environment, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.workers = workers

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while len(list(self.ready.iterdir())) < self.workers or not self._accepts():
            if self.process.poll() is not None:
                raise SystemExit(
                    f"error: uvicorn ({self.variant}) exited with {self.process.returncode}:\n{self.text()}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"error: uvicorn ({self.variant}) not serving in {STARTUP_DEADLINE} s:\n{self.text()}")
            time.sleep(0.05)  # another process's readiness: nothing to wait on but a poll

    def _accepts(self) -> bool:
        with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def post(port: int, key: str) -> tuple[int, bool, bytes]:
    """One request, on a connection of its own: the status, whether it was a replay, the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", "Authorization": AUTHORIZATION, "Idempotency-Key": key}
        connection.request("POST", PATH, body=BODY, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, response.getheader("idempotent-replayed") == "true", body
    finally:
        connection.close()


def check_paths(server: Uvicorn, replay_key: str, tag: str) -> list[str]:
    """Fresh keys run the app; the replay key (completed here) is replayed. Returns what went wrong."""
    failures = []
    where = f"{server.variant} on port {server.port}"
    first, second = post(server.port, f"{tag}-check-1"), post(server.port, f"{tag}-check-2")
    if first[0] != 201 or second[0] != 201 or first[2] == second[2] or first[1] or second[1]:
        failures.append(f"{where}: two fresh keys answered {first} and {second}, not two new 201s")
    primed = post(server.port, replay_key)
    again = post(server.port, replay_key)
    for _ in range(100):  # a middleware that records after it answers is 409 until its record is in
        if again[0] != 409:
            break
        time.sleep(0.02)
        again = post(server.port, replay_key)
    if primed[0] != 201 or again[0] != 201:
        failures.append(f"{where}: the replay key answered {primed[0]}, then {again[0]}, not 201")
    elif server.variant != "bare" and (primed[1] or not again[1] or primed[2] != again[2]):
        failures.append(f"{where}: the replay key was not replayed ({primed} then {again})")
    return failures


@contextmanager
def serving(stores: Stores, workers: int, work: Path) -> Iterator[dict[str, Uvicorn]]:
    with ExitStack() as stack:
        servers = {}
        for variant in VARIANTS:
            servers[variant] = Uvicorn(variant, workers, stores.env[variant], work)
            stack.callback(servers[variant].stop)
        for server in servers.values():
            server.wait_ready()
        yield servers


# -- the run ------------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def spread(values: Sequence[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if values and statistics.median(values) else 0.0


def summarize(store: str, workers: int, case: str, runs: dict[str, list[Run]]) -> dict[str, Any]:
    row: dict[str, Any] = {"store": store, "workers": workers, "case": case}
    for variant, measured in runs.items():
        rps = [run.rps for run in measured]
        row[variant] = {
            "rps": round(statistics.median(rps), 1),
            "p50_ms": round(statistics.median(run.p50_ms for run in measured), 3),
            "p99_ms": round(statistics.median(run.p99_ms for run in measured), 3),
            "spread": round(spread(rps), 3),
            "rounds": [asdict(run) | {"rps": round(run.rps, 1)} for run in measured],
        }
    bare, idempo, floor = (row[variant]["rps"] for variant in VARIANTS)
    row["idempo_over_bare"] = round(idempo / bare, 3)
    row["floor_over_bare"] = round(floor / bare, 3)
    # The two took turns within each round: the median of the rounds' ratios (as make bench's) is the figure; the
    # ratio of the medians, kept in the JSON, can pair a fast round of one with a slow round of the other.
    paired = [f.rps / i.rps for f, i in zip(runs["floor"], runs["idempo"], strict=True) if i.rps]
    row["floor_over_idempo"] = round(statistics.median(paired), 3) if paired else 0.0
    row["floor_over_idempo_of_medians"] = round(floor / idempo, 3)
    row["floor_over_idempo_rounds"] = [round(min(paired), 3), round(max(paired), 3)] if paired else []
    row["verdict"] = "PASS" if row["floor_over_idempo"] <= TARGET else "MISS"
    return row


def bench_store(
    stores: Stores, workers: int, settings: Settings, generator: Generator, work: Path, tag: str
) -> tuple[list[dict[str, Any]], list[str]]:
    failures: list[str] = []
    replay_key = f"{tag}-replay-{workers}"
    runs: dict[str, dict[str, list[Run]]] = {case: {variant: [] for variant in VARIANTS} for case in CASES}
    label = f"{stores.store}, {workers} worker{'s' if workers > 1 else ''}"
    with serving(stores, workers, work) as servers:
        for server in servers.values():
            failures += check_paths(server, replay_key, f"{tag}-{workers}")
        if failures:
            return [], failures
        say(f"{label}: warming up")
        for variant, server in servers.items():
            for case in CASES:
                argument = f"{tag}-{workers}-warm-{variant}" if case == "fresh-key" else replay_key
                generator.run(server.port, case, argument, settings.warmup)
        for round_number in range(settings.rounds):
            shift = round_number % len(VARIANTS)
            order = VARIANTS[shift:] + VARIANTS[:shift]
            for case in CASES:
                for variant in order:
                    argument = f"{tag}-{workers}-{round_number}-{variant}" if case == "fresh-key" else replay_key
                    run = generator.run(servers[variant].port, case, argument, settings.duration)
                    runs[case][variant].append(run)
                    if run.errors:
                        failures.append(f"{label}, {case}, {variant}, round {round_number + 1}: {run.errors} errors")
                    say(
                        f"{label}: round {round_number + 1}/{settings.rounds} {case:<9} {variant:<6} "
                        f"{run.rps:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
                    )
    return [summarize(stores.store, workers, case, runs[case]) for case in CASES], failures


def bench(args: argparse.Namespace, settings: Settings, generator_kind: str, work: Path) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    generator = Generator(generator_kind, work, settings.connections, settings.threads)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    skipped: dict[str, str] = {}
    names: dict[str, dict[str, str]] = {}
    cleanup: dict[str, list[str]] = {}
    load_before = os.getloadavg()
    started = time.time()
    for store in args.stores:
        url = {"redis": args.redis_url, "postgres": args.postgres_url}.get(store)
        store_work = work / store
        store_work.mkdir()
        stores = Stores(store, url, store_work, tag)
        try:
            stores.check()
        except Unavailable as exc:
            skipped[store] = str(exc)
            say(f"{store}: skipped ({exc})")
            continue
        names[store] = stores.names
        try:
            for workers in args.workers:
                rows, failed = bench_store(stores, workers, settings, generator, store_work, tag)
                results += rows
                failures += failed
        finally:
            cleanup[store] = stores.cleanup()
    return {
        "settings": asdict(settings) | {"quick": settings is QUICK, "target_floor_over_idempo": TARGET},
        "environment": environment(generator_kind),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "stores": {store: {"names": names.get(store, {}), "cleanup": cleanup.get(store, [])} for store in names},
        "skipped": skipped,
        "results": results,
        "failures": failures,
    }


def environment(generator_kind: str) -> dict[str, Any]:
    import uvicorn

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "uvicorn": uvicorn.__version__,
        # uvicorn's "auto": uvloop and httptools when installed, else asyncio's loop and h11.
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "generator": wrk_version() if generator_kind == "wrk" else "python (asyncio, benchmarks/load.py)",
        "idempo": idempo_source(),
    }


def idempo_source() -> dict[str, Any]:
    """Which idempo the servers import: its directory, and the commit of its checkout, with whether its ``src/``
    differs from that commit (uncommitted changes are measured too)."""
    import idempo

    package = Path(idempo.__file__).resolve().parent
    source: dict[str, Any] = {"path": str(package)}
    git = ["git", "-C", str(package)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode == 0:
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=False
        )
        source |= {"commit": head.stdout.strip(), "uncommitted_changes": bool(changed.stdout.strip())}
    return source


# -- the command line ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 s runs, one round, 8 connections: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument("--chart", type=Path, metavar="PATH", help="draw the chart into PATH (PNG; needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--stores", default=",".join(STORES), help="of sqlite,redis,postgres (default: all three)")
    parser.add_argument("--workers", default="1,2", help="uvicorn's --workers, in turn (default: 1,2)")
    parser.add_argument("--rounds", type=int, help="timed runs per variant and case (default 5)")
    parser.add_argument("--duration", type=int, help="seconds per timed run (default 5)")
    parser.add_argument("--connections", type=int, help="connections at once (default 32)")
    parser.add_argument("--threads", type=int, help="wrk's threads (default 1)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto", help="default: wrk if any")
    parser.add_argument("--redis-url", default=DEFAULT_URLS["redis"], help="default: %(default)s")
    parser.add_argument("--postgres-url", default=DEFAULT_URLS["postgres"], help="default: %(default)s")
    args = parser.parse_args(argv)
    args.stores = [store.strip() for store in args.stores.split(",") if store.strip()]
    unknown = set(args.stores) - set(STORES)
    if unknown:
        parser.error(f"unknown stores {sorted(unknown)}; known: {', '.join(STORES)}")
    args.workers = [int(n) for n in args.workers.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped by SIGTERM (or SIGINT, which a background job ignores), the run still stops its servers and removes
    # its records on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    base = QUICK if args.quick else FULL
    settings = Settings(
        duration=args.duration or base.duration,
        warmup=base.warmup,
        rounds=args.rounds or base.rounds,
        connections=args.connections or base.connections,
        threads=args.threads or base.threads,
    )
    kind = args.generator
    if kind == "auto":
        kind = "wrk" if shutil.which("wrk") else "python"
        if kind == "python":
            say("wrk is not installed (scripts/wrk installs it): the load comes from this process instead")
    elif kind == "wrk" and not shutil.which("wrk"):
        raise SystemExit("error: wrk is not installed (scripts/wrk installs it, as root)")
    with tempfile.TemporaryDirectory(prefix="idempo-load-") as work:
        data = bench(args, settings, kind, Path(work))
    print(report(data))
    if args.markdown:
        print(markdown(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.chart and data["results"]:
        chart(data, args.chart)
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
