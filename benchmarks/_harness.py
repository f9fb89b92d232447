"""The timing harness and its statistics (see ``bench.py``'s docstring): how much to run, blocks of requests timed
with one loop turn after each, bare and wrapped alternating, calls timed alone, and the medians and ratios of what
one case on one store measured."""

from __future__ import annotations

import asyncio
import gc
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from _apps import KeyFactory, Request, discard, make_requests

from idempo.asgi import ASGIApp

# The targets of the issue, as the most a wrapped request may cost relative to the bare app. Report only.
TARGETS: Final[dict[tuple[str, str], float]] = {
    ("no-key", "memory"): 1.05,
    ("no-key", "sqlite"): 1.05,
    ("fresh-key", "memory"): 1.3,
    ("fresh-key", "sqlite"): 5.0,
    ("replay", "memory"): 0.3,
    ("fresh-key", "redis"): 4.0,
    ("replay", "redis"): 2.0,
    ("fresh-key", "postgres"): 8.0,
}
# Issue 17's target: idempo's time per request at most this many times the floor's (benchmarks/floor.py), in the
# same run, on every store, for each of these cases. Report only.
FLOOR_TARGET: Final = 1.15
FLOOR_CASES: Final = ("no-key", "fresh-key", "replay", "fresh-key-1k")


@dataclass(frozen=True)
class Settings:
    """How much to run.

    Each case gets *reps* repetitions of N requests per side. N is *n* if given; otherwise it is chosen per case
    from a timed calibration block so that one repetition (both sides) takes about *budget_ms*, between two blocks
    and *max_n*: a SQLite fresh key costs ten times a replay, and a PostgreSQL one ten times more, and this keeps
    them all well sampled and the whole run near a minute. *warmup* requests per side go first; requests are timed
    in blocks of *block*. The store calls and server operations timed alone get a third of *budget_ms* each.
    """

    reps: int
    warmup: int
    block: int
    n: int | None = None
    budget_ms: float = 300.0
    max_n: int = 3000


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


def rotation(sides: int, rep: int) -> tuple[int, ...]:
    """The order the *sides* take turns in, in repetition *rep*: each of their orders in turn (with two sides,
    which one starts alternates; with three, the six orders), so that no side always runs right after the same one
    (the side after the bare app runs colder)."""
    orders = list(itertools.permutations(range(sides)))
    return orders[rep % len(orders)]


async def time_sides(
    apps: Sequence[ASGIApp],
    case: str,
    store: str,
    n: int,
    block: int,
    keys: KeyFactory,
    *,
    order: Sequence[int] | None = None,
) -> list[float]:
    """One repetition: *n* requests through each of *apps*, in blocks that strictly take turns between them in
    *order* (indexes of *apps*; by default as given), so that all see the same noise and no block follows one of its
    own side (which runs warmer). One short untimed block of each goes first, after the ``gc.collect()``, so that
    none pays for the cold start alone. Returns µs per request of each app, in the order of *apps*."""
    order = range(len(apps)) if order is None else order
    settle = min(block, 10)
    timed = {i: blocks(make_requests(case, store, n, keys), block) for i in order}
    settling = {i: make_requests(case, store, settle, keys) for i in order}
    total_ns = dict.fromkeys(order, 0)
    gc.collect()
    for i in order:
        await time_block(apps[i], settling[i])
    for turn in range(len(timed[order[0]])):
        for i in order:
            total_ns[i] += await time_block(apps[i], timed[i][turn])
    return [total_ns[i] / n / 1000 for i in range(len(apps))]


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
    """:func:`time_sides` of the bare and the wrapped app, the bare one's block first if *bare_first*. Returns µs
    per request, bare and wrapped."""
    bare_us, wrapped_us = await time_sides(
        [bare, wrapped], case, store, n, block, keys, order=(0, 1) if bare_first else (1, 0)
    )
    return bare_us, wrapped_us


Operation = Callable[[], Awaitable[None]]


async def time_ops(operation: Operation, count: int) -> float:
    """µs per call of *operation*, over *count* calls one after the other (no loop turn in between: a request's
    loop turn is in both the bare and the wrapped time, and so cancels out of the split)."""
    start = time.perf_counter_ns()
    for _ in range(count):
        await operation()
    return (time.perf_counter_ns() - start) / count / 1000


@dataclass
class Probe:
    """Something timed alone in every repetition: the store calls of a case, or a server's bare operation."""

    label: str
    operation: Operation
    n: int = 0
    samples_us: list[float] = field(default_factory=list)

    async def calibrate(self, settings: Settings) -> None:
        """Warm up; then N such that one block takes about a third of ``settings.budget_ms``."""
        await time_ops(self.operation, settings.block)
        if settings.n is not None:
            self.n = settings.n
            return
        us = await time_ops(self.operation, settings.block)
        n = int(settings.budget_ms * 1000 / 3 / us) // settings.block * settings.block
        self.n = max(settings.block, min(settings.max_n, n))

    async def sample(self) -> None:
        self.samples_us.append(await time_ops(self.operation, self.n))

    @property
    def us(self) -> float:
        return statistics.median(self.samples_us)


async def calibrate(apps: Sequence[ASGIApp], case: str, store: str, settings: Settings, keys: KeyFactory) -> int:
    """N such that a repetition of *case* (N requests through each of *apps*) takes about ``settings.budget_ms``."""
    us = await time_sides(apps, case, store, settings.block, settings.block, keys)
    n = int(settings.budget_ms * 1000 / sum(us)) // settings.block * settings.block
    return max(2 * settings.block, min(settings.max_n, n))


# -- results -----------------------------------------------------------------------------------------------------


@dataclass
class ServerResult:
    """A server's bare operation, as measured in the run."""

    store: str
    url: str
    op: str
    client: str
    names: dict[str, str]
    n: int = 0
    us_per_op: float = 0.0
    samples_us: list[float] = field(default_factory=list)
    cleanup: str = ""


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
    # The split of a wrapped request (see the module's docstring); µs per request.
    store_calls_us: float = 0.0
    store_calls_samples_us: list[float] = field(default_factory=list)
    server_ops_us: float | None = None
    remainder_us: float = 0.0
    # The floor (benchmarks/floor.py), timed in the same blocks, for the cases of FLOOR_CASES.
    floor: FloorResult | None = None

    def summarize(self, server: ServerResult | None, targets: Mapping[tuple[str, str], float] = TARGETS) -> None:
        """Medians; the ratio is the median of the repetitions' ratios (each one of a bare and a wrapped run
        that saw the same noise), which is steadier than a ratio of medians on a busy machine. The target is
        *targets*' (the ASGI ones by default)."""
        self.us_per_request = statistics.median(self.samples_us)
        self.bare_us_per_request = statistics.median(self.bare_samples_us)
        self.ratio = statistics.median(w / b for w, b in zip(self.samples_us, self.bare_samples_us, strict=True))
        self.target = targets.get((self.case, self.store))
        if self.target is not None:
            self.verdict = "PASS" if self.ratio <= self.target else "MISS"
        if self.store_calls_samples_us:
            self.store_calls_us = statistics.median(self.store_calls_samples_us)
        if server is not None:
            self.server_ops_us = sum(self.round_trips.values()) * server.us_per_op
        self.remainder_us = self.us_per_request - self.app_us - self.store_calls_us
        if self.floor is not None:
            self.floor.summarize(self)

    @property
    def app_us(self) -> float:
        """The app's share of a wrapped request: the bare request's time, or nothing on a replay."""
        return 0.0 if self.case.startswith("replay") else self.bare_us_per_request


@dataclass
class FloorResult:
    """The floor on one case of one store, timed in the same blocks as the bare app and idempo (a third side)."""

    round_trips: dict[str, float] = field(default_factory=dict)
    samples_us: list[float] = field(default_factory=list)
    us_per_request: float = 0.0
    ratio: float = 0.0  # the floor / bare
    idempo_ratio: float = 0.0  # idempo / the floor: the figure of the target
    idempo_ratios: list[float] = field(default_factory=list)
    target: float = FLOOR_TARGET
    verdict: str = "-"

    def summarize(self, case: CaseResult) -> None:
        """Medians, and medians of the repetitions' ratios (each of runs that saw the same noise), as for *case*."""
        self.us_per_request = statistics.median(self.samples_us)
        self.ratio = statistics.median(f / b for f, b in zip(self.samples_us, case.bare_samples_us, strict=True))
        self.idempo_ratios = [w / f for w, f in zip(case.samples_us, self.samples_us, strict=True)]
        self.idempo_ratio = statistics.median(self.idempo_ratios)
        self.verdict = "PASS" if self.idempo_ratio <= self.target else "MISS"


@dataclass
class Outcome:
    """Everything a run measured, and the stores it had to skip (with why)."""

    results: list[CaseResult] = field(default_factory=list)
    servers: list[ServerResult] = field(default_factory=list)
    wsgi_results: list[CaseResult] = field(default_factory=list)  # the WSGI middleware's cases (_wsgi.py)
    skipped: dict[str, str] = field(default_factory=dict)
    floor_clients: dict[str, str] = field(default_factory=dict)  # per store: the floor's client (floor.py)
    floor_skipped: dict[str, str] = field(default_factory=dict)  # per store: why the floor was not run there
