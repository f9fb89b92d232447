"""Where idempo's distance to the floor is spent, per request: a diagnostic for issue 17, not a target.

Run it with ``make bench-split`` (or ``.venv/bin/python benchmarks/split.py``); ``--stores`` and ``--cases`` pick
what to run, ``--quick`` is a smoke run. Nothing it prints is a ratio to compare with ``make bench``'s: the probe
below adds its own cost to both sides.

Theory of operation. idempo and the floor (``floor.py``) each wrap the same FastAPI app (``_apps.py``), behind a
probe of the app that times, per request, with ``time.perf_counter_ns``:

``app``
    the app's own work: the time inside the app less the time it spent in the ``receive`` and ``send`` the
    middleware gave it;
``callbacks``
    those ``receive`` and ``send`` calls: the middleware buffering the body, passing on and capturing the
    response, and recording it (its ``complete``, a store round trip on a network store) before the last message;
``around``
    the rest of the request: the middleware before and after the app (reading the key, the body's fingerprint,
    the claim, the objects of one request); on a replay, the whole request.

The two sides take turns in blocks of requests within each repetition, as in ``bench.py``, and the medians of the
repetitions are printed, with idempo's excess over the floor in each part. A difference in ``app`` is not the
middleware's code: the app runs its very same code under both; it is what the middleware's work costs the app
(most likely caches the app finds colder). On the 2-core machine this was written on (FastAPI, memory store, fresh
keys): idempo +8.4 µs around, +3.9 µs in the callbacks, and the app itself +4.7 µs slower than under the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from _apps import KeyFactory, call, discard, make_app, make_requests, wrap
from _harness import blocks, rotation
from _servers import DEFAULT_URLS, SERVERS, Server, Unavailable, opened
from floor import FloorMiddleware

from idempo.asgi import ASGIApp, Message, Receive, Scope, Send

STORES: Final = ("memory", "sqlite", "redis", "postgres")
CASES: Final = ("fresh-key", "replay")
PARTS: Final = ("total", "app", "callbacks", "around")
# Requests per block and side: on a network store a request is ten times longer, so that a run stays short.
N: Final = {"memory": 2000, "sqlite": 1000, "redis": 300, "postgres": 300}
BLOCK: Final = 100
REPS: Final = 11


class AppProbe:
    """*app*, timed: the nanoseconds spent inside it (``inside``) and inside the callbacks it was given
    (``callbacks``), summed over the requests since :meth:`reset`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inside = 0
        self.callbacks = 0

    def reset(self) -> None:
        self.inside = self.callbacks = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        clock = time.perf_counter_ns

        async def timed_receive() -> Message:
            start = clock()
            message = await receive()
            self.callbacks += clock() - start
            return message

        async def timed_send(message: Message) -> None:
            start = clock()
            await send(message)
            self.callbacks += clock() - start

        start = clock()
        await self.app(scope, timed_receive, timed_send)
        self.inside += clock() - start


@dataclass
class Side:
    """One middleware around its own probe of the app, and its samples: µs per request, by part."""

    label: str
    middleware: ASGIApp
    probe: AppProbe
    samples: dict[str, list[float]] = field(default_factory=lambda: {part: [] for part in PARTS})

    def median(self, part: str) -> float:
        return statistics.median(self.samples[part])


async def time_side(side: Side, requests: list[tuple[Scope, Receive]]) -> tuple[int, int, int]:
    """*requests* through *side*, one loop turn after each (as ``_harness.time_block``): nanoseconds in all, in
    the app, in its callbacks."""
    side.probe.reset()
    start = time.perf_counter_ns()
    for scope, receive in requests:
        await side.middleware(scope, receive, discard)
        await asyncio.sleep(0)
    return time.perf_counter_ns() - start, side.probe.inside, side.probe.callbacks


async def split_case(sides: Sequence[Side], case: str, store: str, n: int, reps: int, keys: KeyFactory) -> None:
    """*reps* repetitions of *n* requests of *case* per side, the sides taking turns block by block."""
    for rep in range(reps):
        order = rotation(len(sides), rep)
        timed = {i: blocks(make_requests(case, store, n, keys), min(BLOCK, n)) for i in order}
        totals = {i: [0, 0, 0] for i in order}
        gc.collect()
        for turn in range(len(timed[order[0]])):
            for i in order:
                measured = await time_side(sides[i], timed[i][turn])
                totals[i] = [a + b for a, b in zip(totals[i], measured, strict=True)]
        for i in order:
            total, inside, callbacks = (ns / n / 1000 for ns in totals[i])
            parts = {"total": total, "app": inside - callbacks, "callbacks": callbacks, "around": total - inside}
            for part, us in parts.items():
                sides[i].samples[part].append(us)


async def split_store(
    name: str, server: Server | None, tmp: Path, cases: Sequence[str], n: int, reps: int, keys: KeyFactory
) -> list[str]:
    """The split of each case on store *name*, as lines of the table."""
    lines = []
    async with opened(name, server, tmp) as both:
        if both.floor is None:
            raise Unavailable(f"no floor ({both.no_floor})")
        app = make_app()
        idempo_probe, floor_probe = AppProbe(app), AppProbe(app)
        sides = [
            Side("idempo", wrap(idempo_probe, both.store), idempo_probe),
            Side("floor", FloorMiddleware(floor_probe, both.floor), floor_probe),
        ]
        for side in sides:  # the replay key's response, stored
            status, _, _ = await call(side.middleware, make_requests("replay", name, 1, keys)[0])
            if status != 200:
                msg = f"seeding the replay key of {side.label} on {name} answered {status}"
                raise RuntimeError(msg)
        for case in cases:
            await split_case(sides, case, name, min(n, BLOCK), 1, keys)  # a warm-up, its samples dropped
            for side in sides:
                side.samples = {part: [] for part in PARTS}
            await split_case(sides, case, name, n, reps, keys)
            idempo_side, floor_side = sides
            for side in sides:
                figures = "".join(f"{side.median(part):14.1f}" for part in PARTS)
                lines.append(f"{case:10s} {name:9s} {side.label:8s}{figures}")
            excess = "".join(f"{idempo_side.median(part) - floor_side.median(part):+14.1f}" for part in PARTS)
            lines.append(f"{case:10s} {name:9s} {'excess':8s}{excess}")
    return lines


async def run(stores: Sequence[str], cases: Sequence[str], quick: bool, urls: dict[str, str]) -> int:
    keys = KeyFactory()
    header = f"{'case':10s} {'store':9s} {'side':8s}" + "".join(f"{part + ' µs':>14s}" for part in PARTS)
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="idempo-split-") as tmp:
        for name in stores:
            server = SERVERS[name](urls[name]) if name in SERVERS else None
            if server is not None:
                try:
                    await server.connect()
                except Unavailable as exc:
                    print(f"{name}: skipped ({exc})")
                    continue
            try:
                n, reps = (20, 2) if quick else (N[name], REPS)
                for line in await split_store(name, server, Path(tmp), cases, n, reps, keys):
                    print(line, flush=True)
            except Unavailable as exc:
                print(f"{name}: skipped ({exc})")
            finally:
                if server is not None:
                    await server.aclose()
    print("µs per request, medians of the repetitions; excess: idempo - floor. See the module's docstring.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated stores (default: all four)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: fresh-key,replay)")
    parser.add_argument("--quick", action="store_true", help="a few requests only: a smoke run")
    args = parser.parse_args(argv)
    stores = [name for name in args.stores.split(",") if name]
    cases = [case for case in args.cases.split(",") if case]
    unknown = [name for name in stores if name not in STORES] + [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown store or case: {', '.join(unknown)}")
    return asyncio.run(run(stores, cases, args.quick, dict(DEFAULT_URLS)))


if __name__ == "__main__":
    sys.exit(main())
