"""Small helpers of the store tests: a fake clock, claim unpacking, PostgreSQL tables of a test's own, and a scenario
written once for a store and its sync twin (:class:`Twin`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from idempo import Acquired, Claim, Existing, Record, store_from_url
from idempo._core.plans import run, run_async
from idempo.stores import sync_store_from_url

T = TypeVar("T")


class FakeClock:
    """A clock the test moves by hand (a store reads it instead of its own or its server's)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_of(claim: Claim) -> str:
    assert isinstance(claim, Acquired), claim
    return claim.token


def record_of(claim: Claim) -> Record:
    assert isinstance(claim, Existing), claim
    return claim.record


def new_table() -> str:
    """A table name no other test uses."""
    return f"idempo_test_{uuid.uuid4().hex[:16]}"


def drop_table(url: str, table: str) -> None:
    import psycopg  # only the PostgreSQL tests get here

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table)))


class Twin:
    """One of a store and its sync twin, for a scenario written once as a plan (see :mod:`idempo._core.plans`).

    The scenario is a generator that yields each store call it makes, ``result = yield store.claim(...)``: from an
    async store the call is a coroutine, which :meth:`run` awaits; from a sync store it is already the result, which
    :meth:`run` hands back as it is. A failure raises at the ``yield`` either way, so ``pytest.raises`` around it
    works for both. The scenario runs in an event loop of its own (async) or in a thread of its own (sync), and
    fails instead of hanging after *guard* seconds.
    """

    def __init__(self, kind: str, guard: float = 60.0) -> None:
        self.kind = kind
        self.is_async = kind == "async"
        self.guard = guard

    def __repr__(self) -> str:
        return self.kind

    def open(self, url: str, **options: Any) -> Any:
        """The store *url* names (``store_from_url``), or its sync twin (``sync_store_from_url``)."""
        return store_from_url(url, **options) if self.is_async else sync_store_from_url(url, **options)

    def run(self, scenario: Generator[Any, Any, T]) -> T:
        """Drive *scenario* to its end: its value."""
        if self.is_async:

            async def guarded() -> T:
                async with asyncio.timeout(self.guard):
                    return await run_async(scenario, _awaited)

            return asyncio.run(guarded())
        executor = ThreadPoolExecutor(1)
        try:
            return executor.submit(run, scenario, _as_is).result(timeout=self.guard)
        finally:
            executor.shutdown(wait=False)  # a scenario that hung is left behind, failed

    def all(self, calls: Iterable[Callable[[], Any]]) -> Any:
        """To yield: *calls* made at once (tasks of the loop, or threads); each one's result or exception."""
        calls = list(calls)
        if self.is_async:
            return asyncio.gather(*(call() for call in calls), return_exceptions=True)
        with ThreadPoolExecutor(len(calls)) as executor:
            futures = [executor.submit(call) for call in calls]
            return [future.exception(timeout=self.guard) or future.result() for future in futures]

    def start(self, call: Callable[[], Any]) -> Any:
        """*call* started in the background (a task, or a thread): :meth:`outcome` of it later."""
        if self.is_async:
            return asyncio.ensure_future(call())
        executor = ThreadPoolExecutor(1)
        future = executor.submit(call)
        executor.shutdown(wait=False)
        return future

    def outcome(self, started: Any) -> Any:
        """To yield: the result of what :meth:`start` started, once it is done (or its exception, raised)."""
        return started if self.is_async else started.result(timeout=self.guard)

    def pause(self, seconds: float) -> Any:
        """To yield: a pause of *seconds* (a timer of the event loop, or a sleep of the thread)."""
        if self.is_async:
            return asyncio.sleep(seconds)
        time.sleep(seconds)
        return None

    def records(self, iterator: Any) -> Any:
        """To yield: the records of a ``scan``, as a list."""
        if self.is_async:

            async def collect() -> list[Any]:
                return [record async for record in iterator]

            return collect()
        return list(iterator)


async def _awaited(call: Awaitable[Any]) -> Any:
    return await call


def _as_is(result: Any) -> Any:
    return result


TWINS = ("async", "sync")
"""The params of a module's ``twin`` fixture."""
