"""Plans: logic written once, run by a blocking or an awaiting runner. idempo's one sync/async vocabulary.

A *plan* is a generator that yields *effects* (requests for I/O: a SQL statement, a Lua script, a store call, a
pause, running the user's function) and receives each effect's result back, or has its exception thrown in at the
``yield`` (any exception: a cancellation or an interrupt too, so that the plan can clean up, e.g. release a key, and
let it through). It decides everything and performs nothing, so it is written once; a *runner* performs the effects:

- :func:`run` performs each with a blocking function (the sync twins: ``SyncSQLiteStore``, ``@idempotent`` on a
  plain function, the WSGI face);
- :func:`run_async` awaits each (the async stores, ``@idempotent`` on a coroutine function, the ASGI middleware).

A plan that yields items for its caller as well (a scan's records) is driven by :func:`iterate` and
:func:`iterate_async`, which hand the items of the caller's type to the caller and every other one to the
performer.

These four functions are the only places where sync and async code differ; everything they drive is shared.
Strictly private (pure: no I/O, no idempo imports beyond the core).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, TypeVar

__all__ = ["Plan", "iterate", "iterate_async", "run", "run_async"]

T = TypeVar("T")
E = TypeVar("E")
Item = TypeVar("Item")

Plan = Generator[E, Any, T]
"""A plan that yields effects of type ``E`` and returns a ``T``."""


def run(plan: Generator[E, Any, T], perform: Callable[[E], Any]) -> T:
    """Drive *plan* to its end, performing each effect it yields with the blocking *perform*; what *perform*
    raises is thrown into the plan at its ``yield``, where the plan may handle it."""
    reply: Any = None
    failure: BaseException | None = None
    while True:
        try:
            effect = plan.send(reply) if failure is None else plan.throw(failure)
        except StopIteration as done:
            result: T = done.value
            return result
        try:
            reply, failure = perform(effect), None
        except BaseException as exc:  # noqa: BLE001 - the plan decides what a failure means (a cancellation too)
            reply, failure = None, exc


async def run_async(plan: Generator[E, Any, T], perform: Callable[[E], Awaitable[Any]]) -> T:
    """:func:`run`, awaiting each effect's result."""
    reply: Any = None
    failure: BaseException | None = None
    while True:
        try:
            effect = plan.send(reply) if failure is None else plan.throw(failure)
        except StopIteration as done:
            result: T = done.value
            return result
        try:
            reply, failure = await perform(effect), None
        except BaseException as exc:  # noqa: BLE001 - as in run
            reply, failure = None, exc


def iterate(plan: Generator[Any, Any, None], items: type[Item], perform: Callable[[Any], Any]) -> Iterator[Item]:
    """Drive *plan*, yielding to the caller what it yields of type *items* (a scan's records) and performing
    everything else with *perform*; what *perform* raises is thrown into the plan, as in :func:`run`. Closing the
    iterator closes the plan."""
    reply: Any = None
    failure: BaseException | None = None
    try:
        while True:
            try:
                item = plan.send(reply) if failure is None else plan.throw(failure)
            except StopIteration:
                return
            if isinstance(item, items):
                reply, failure = None, None
                yield item
                continue
            try:
                reply, failure = perform(item), None
            except Exception as exc:  # noqa: BLE001 - as in run
                reply, failure = None, exc
    finally:
        plan.close()


async def iterate_async(
    plan: Generator[Any, Any, None], items: type[Item], perform: Callable[[Any], Awaitable[Any]]
) -> AsyncIterator[Item]:
    """:func:`iterate`, awaiting each effect's result."""
    reply: Any = None
    failure: BaseException | None = None
    try:
        while True:
            try:
                item = plan.send(reply) if failure is None else plan.throw(failure)
            except StopIteration:
                return
            if isinstance(item, items):
                reply, failure = None, None
                yield item
                continue
            try:
                reply, failure = await perform(item), None
            except Exception as exc:  # noqa: BLE001 - as in run
                reply, failure = None, exc
    finally:
        plan.close()
