"""Fifty identical requests at once, against ``uvicorn --workers 4`` sharing one SQLite file: one execution."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import Server, run_server

from ._scenarios import execute_once_across_workers, wait_and_all_get_the_one_response

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("e2e-concurrency"), lease=30.0) as running:
        yield running


async def test_fifty_concurrent_identical_requests_execute_once_across_workers(server: Server) -> None:
    await execute_once_across_workers(server)


async def test_fifty_concurrent_identical_requests_wait_and_all_get_the_one_response(server: Server) -> None:
    await wait_and_all_get_the_one_response(server)
