"""Plans and their two runners: the same plan gives the same result, blocking or awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from idempo._core.plans import iterate, iterate_async, run, run_async


def _doubling(values: list[int]) -> Generator[int, int, int]:
    """Yields each value to be doubled by the performer; a failure to double 13 is handled as 0."""
    total = 0
    for value in values:
        try:
            total += yield value
        except ValueError:
            total += 0
    return total


def _perform(value: int) -> int:
    if value == 13:
        raise ValueError("unlucky")
    return value * 2


async def _perform_async(value: int) -> int:
    await asyncio.sleep(0)
    return _perform(value)


@pytest.mark.parametrize("values", [[], [1, 2, 3], [13], [1, 13, 2]])
def test_both_runners_give_the_same_result(values: list[int]) -> None:
    expected = sum(2 * value for value in values if value != 13)
    assert run(_doubling(values), _perform) == expected
    assert asyncio.run(run_async(_doubling(values), _perform_async)) == expected


def test_a_failure_the_plan_does_not_handle_reaches_the_caller() -> None:
    def plan() -> Generator[int, int, None]:
        yield 13

    with pytest.raises(ValueError, match="unlucky"):
        run(plan(), _perform)
    with pytest.raises(ValueError, match="unlucky"):
        asyncio.run(run_async(plan(), _perform_async))


def _scan() -> Generator[Any, Any, None]:
    """Yields requests (ints) whose results are lists of records (strs), and the records themselves."""
    for page in (1, 2):
        records = yield page
        yield from records


def _page(page: int) -> list[str]:
    return [f"r{page}a", f"r{page}b"]


async def _page_async(page: int) -> list[str]:
    return _page(page)


def test_iterate_hands_effects_to_the_performer_and_items_to_the_caller() -> None:
    assert list(iterate(_scan(), str, _page)) == ["r1a", "r1b", "r2a", "r2b"]

    async def collect() -> list[str]:
        return [item async for item in iterate_async(_scan(), str, _page_async)]

    assert asyncio.run(collect()) == ["r1a", "r1b", "r2a", "r2b"]


def test_closing_the_iterator_closes_the_plan() -> None:
    closed = []

    def plan() -> Generator[Any, Any, None]:
        try:
            yield "first"
            yield "second"
        finally:
            closed.append(True)

    items = iterate(plan(), str, _page)
    assert next(items) == "first"
    items.close()  # type: ignore[attr-defined]  # a generator, typed as an Iterator
    assert closed == [True]


def test_iterate_throws_a_failure_into_the_plan_as_run_does() -> None:
    """A scan page that fails once is asked again by the plan, which then lists its items."""

    def plan() -> Generator[Any, Any, None]:
        try:
            records = yield 13
        except ValueError:
            records = yield 1
        yield from records

    assert list(iterate(plan(), str, lambda page: _perform(page) and _page(page))) == ["r1a", "r1b"]

    async def collect() -> list[str]:
        async def perform(page: int) -> list[str]:
            await _perform_async(page)
            return _page(page)

        return [item async for item in iterate_async(plan(), str, perform)]

    assert asyncio.run(collect()) == ["r1a", "r1b"]
