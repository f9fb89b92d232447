"""Instructions per request, counted rather than timed: a diagnostic for issue 17, not a target.

Run it with ``make bench-instructions`` (or ``.venv/bin/python benchmarks/instructions.py``); ``--stores`` and
``--cases`` pick what to run, ``--quick`` is a smoke run. It needs valgrind (``apt-get install valgrind``).

Why. On a shared virtual machine a timing moves by 10-30% from one run to the next, so a change worth 2% of a request
cannot be told from the noise by ``make bench`` (nor even by many alternating runs). The number of instructions the
processor executes for a request barely moves at all (valgrind's callgrind counts them: the same to a few parts in a
thousand from run to run). It is not the time a request takes (a cache miss costs a hundred instructions' time, a
round trip's wait none), but a change that removes instructions removes work, and one that adds them adds work.

Theory of operation. For each store, case and side, a child process runs under ``valgrind --tool=callgrind`` and
serves N requests, built beforehand, through the side: ``idempo`` (``IdempotencyMiddleware`` as ``make bench``
configures it), ``floor`` (``floor.py``), or ``none`` (the requests built and the event loop turned once per
request, as for the others, and nothing else). Each child runs twice, with N = SMALL and N = LARGE requests, and the
difference of the two totals over LARGE - SMALL is the count per request: what a run costs whatever its N (start-up,
imports, priming the store) drops out. ``none`` is then taken away from the other two, so that what is printed is
the middleware, the app and the store's client per request. Each child keeps its records under names of its own (a
Redis prefix, a PostgreSQL table), which this process removes at the end.

The process of a network store's server is not counted, except with ``--redis-server``: then each child talks to a
private ``redis-server`` started under callgrind on a free port (discarded after), and the server's instructions per
request are printed too (scripts, commands, replies: where a Lua script's cost shows). The server's count moves more
than the client's (up to a tenth between runs): Redis's own housekeeping (its cron, the active expiry of keys) runs
by the clock, and a longer run does more of it. PostgreSQL's server runs a process per connection, forked by the
postmaster; it is not counted here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from _apps import KeyFactory, call, discard, make_app, make_requests, wrap
from _servers import DEFAULT_URLS, NETWORK_STORES, SERVERS, Server, Unavailable, free_port
from floor import Backend, FloorMiddleware, MemoryBackend, SQLiteBackend

from idempo import MemoryStore, SQLiteStore, Store

STORES: Final = ("memory", "sqlite", "redis", "postgres")
CASES: Final = ("fresh-key", "replay")
SIDES: Final = ("none", "idempo", "floor")
SMALL, LARGE = 200, 1200
QUICK_SMALL, QUICK_LARGE = 20, 60
CHILD_TIMEOUT: Final = 900.0  # seconds a child may take under valgrind (a network store's LARGE run takes ~1 min)
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


# -- the child: N requests through one side ---------------------------------------------------------------------


async def serve(side: str, store_name: str, case: str, n: int, url: str, tag: str, tmp: Path) -> None:
    """Serve *n* requests of *case* through *side* on *store_name* (at *url*, under names made of *tag*)."""
    server: Server | None = SERVERS[store_name](url, tag=tag) if store_name in NETWORK_STORES else None
    store: Store
    backend: Backend
    if server is not None:
        store, backend = server.open_store(), server.floor_backend()
    elif store_name == "memory":
        store, backend = MemoryStore(), MemoryBackend()
    else:
        store, backend = SQLiteStore(tmp / "idempo.db"), SQLiteBackend(str(tmp / "floor.db"))
    app = make_app()
    middleware = wrap(app, store) if side == "idempo" else FloorMiddleware(app, backend)
    keys = KeyFactory()
    try:
        for request in make_requests(case, store_name, 3, keys):  # tables made, scripts loaded, the replay's key
            status, _, _ = await call(middleware, request)
            assert status == 200, status
        requests = make_requests(case, store_name, n, keys)
        if side == "none":
            for _ in requests:
                await asyncio.sleep(0)
        else:
            for scope, receive in requests:
                await middleware(scope, receive, discard)
                await asyncio.sleep(0)
    finally:
        await store.close()
        await backend.aclose()


# -- the parent: the children under valgrind, and the table ------------------------------------------------------


@dataclass
class Count:
    """Instructions per request of one store, case and side: the client's, and the private Redis server's."""

    client: float
    server: float | None = None


def collected(output: str, what: str) -> int:
    """The instructions callgrind collected, from its report *output*."""
    found = _COLLECTED.search(output)
    if found is None:
        msg = f"no count from callgrind for {what}:\n{output[-2000:]}"
        raise RuntimeError(msg)
    return int(found.group(1))


CALLGRIND: Final = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
counter: tuple[str, ...] = CALLGRIND  # what runs a process and says on stderr what it counted (--counter)


def callgrind(*command: str) -> list[str]:
    return [*counter, *command]


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, list[int]]]:
    """A redis-server of its own under callgrind: its URL, and a list that gets its count once it has stopped."""
    port = free_port()
    server = subprocess.Popen(
        callgrind("redis-server", "--port", str(port), "--save", "", "--appendonly", "no"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    count: list[int] = []
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0", count
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        output, _ = server.communicate(timeout=CHILD_TIMEOUT)
        count.append(collected(output, "redis-server"))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def run_child(side: str, store: str, case: str, n: int, url: str, tag: str) -> int:
    """Instructions of one child, run to its end under callgrind."""
    with tempfile.TemporaryDirectory(prefix="idempo-instructions-") as tmp:
        command = [sys.executable, __file__, "--child", side, store, case, str(n), url, tag, tmp]
        proc = subprocess.run(callgrind(*command), capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    if proc.returncode != 0:
        msg = f"{side} {store} {case} N={n}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return collected(proc.stderr, f"{side} {store} {case}")


def measure(
    side: str, store: str, case: str, sizes: tuple[int, int], url: str, tags: list[str], redis_server: bool
) -> Count:
    """Instructions per request of *side*: two children, their difference over the difference of their sizes."""
    clients: list[int] = []
    servers: list[int] = []
    for n in sizes:
        tag = secrets.token_hex(6)
        if redis_server and store == "redis":
            with private_redis() as (private_url, count):
                clients.append(run_child(side, store, case, n, private_url, tag))
            servers.append(count[0])
        else:
            tags.append(tag)  # for clean_up
            clients.append(run_child(side, store, case, n, url, tag))
    span = sizes[1] - sizes[0]
    server = (servers[1] - servers[0]) / span if servers else None
    return Count((clients[1] - clients[0]) / span, server)


async def clean_up(store: str, url: str, tags: list[str]) -> None:
    """Remove what the children left on the shared server of *store*: their keys, or their tables."""
    for tag in tags:
        server = SERVERS[store](url, tag=tag)
        await server.connect()
        try:
            print(f"  {store}: {await server.cleanup()}", file=sys.stderr)
        finally:
            await server.aclose()


def report(rows: list[tuple[str, str, dict[str, Count]]]) -> None:
    print("Instructions per request (callgrind), the requests' own building and loop turn taken away:")
    print(f"{'case':<10} {'store':<9} {'idempo':>10} {'floor':>10} {'excess':>10} {'idempo/floor':>13}  server (Redis)")
    print("-" * 96)
    for case, store, counts in rows:
        none = counts["none"].client
        idempo, floor = counts["idempo"].client - none, counts["floor"].client - none
        ratio = f"{idempo / floor:.2f}x" if floor else "-"
        line = f"{case:<10} {store:<9} {idempo:>10.0f} {floor:>10.0f} {idempo - floor:>+10.0f} {ratio:>13}"
        server_idempo, server_floor = counts["idempo"].server, counts["floor"].server
        if server_idempo is not None and server_floor is not None:
            ratio = f"{server_idempo / server_floor:.2f}x" if server_floor else "-"
            line += f"  idempo {server_idempo:.0f}, floor {server_floor:.0f} ({ratio})"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated stores (default: all four)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: both)")
    parser.add_argument("--redis-url", default=DEFAULT_URLS["redis"])
    parser.add_argument("--postgres-url", default=DEFAULT_URLS["postgres"])
    parser.add_argument("--redis-server", action="store_true", help="count a private redis-server's instructions too")
    parser.add_argument("--quick", action="store_true", help="a few requests only: a smoke run")
    parser.add_argument(
        "--counter",
        help="instead of callgrind: a command that runs the one after it and prints "
        "'Collected : <count>' on stderr as callgrind does (the tests' own)",
    )
    args = parser.parse_args(argv)
    global counter  # the command line's choice, for the whole run
    if args.counter:
        counter = tuple(shlex.split(args.counter))
    elif shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind, or make bench-instructions)", file=sys.stderr)
        return 2
    stores = [store for store in args.stores.split(",") if store]
    cases = [case for case in args.cases.split(",") if case]
    sizes = (QUICK_SMALL, QUICK_LARGE) if args.quick else (SMALL, LARGE)
    urls = {"redis": args.redis_url, "postgres": args.postgres_url, "memory": "", "sqlite": ""}
    rows = []
    for store in stores:
        tags: list[str] = []
        try:
            for case in cases:
                counts = {
                    side: measure(side, store, case, sizes, urls[store], tags, args.redis_server) for side in SIDES
                }
                rows.append((case, store, counts))
                print(f"  {store} {case}: done", file=sys.stderr, flush=True)
        except Unavailable as exc:
            print(f"  {store}: skipped ({exc})", file=sys.stderr)
        finally:
            if store in NETWORK_STORES and tags:
                asyncio.run(clean_up(store, urls[store], tags))
    report(rows)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        side, store, case, n, url, tag, tmp = sys.argv[2:9]
        asyncio.run(serve(side, store, case, int(n), url, tag, Path(tmp)))
    else:
        sys.exit(main())
