"""The timing harness and its statistics (see ``bench.py``'s docstring): how much to run, blocks of requests timed
with one loop turn after each, bare and wrapped alternating, calls timed alone, and the medians and ratios of what
one case on one store measured."""

from __future__ import annotations

import asyncio
import gc
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


async def calibrate(
    bare: ASGIApp, wrapped: ASGIApp, case: str, store: str, settings: Settings, keys: KeyFactory
) -> int:
    """N such that a repetition of *case* (N requests per side) takes about ``settings.budget_ms``."""
    bare_us, wrapped_us = await time_pair(bare, wrapped, case, store, settings.block, settings.block, keys)
    n = int(settings.budget_ms * 1000 / (bare_us + wrapped_us)) // settings.block * settings.block
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

    @property
    def app_us(self) -> float:
        """The app's share of a wrapped request: the bare request's time, or nothing on a replay."""
        return 0.0 if self.case.startswith("replay") else self.bare_us_per_request


@dataclass
class Outcome:
    """Everything a run measured, and the stores it had to skip (with why)."""

    results: list[CaseResult] = field(default_factory=list)
    servers: list[ServerResult] = field(default_factory=list)
    wsgi_results: list[CaseResult] = field(default_factory=list)  # the WSGI middleware's cases (_wsgi.py)
    skipped: dict[str, str] = field(default_factory=dict)
