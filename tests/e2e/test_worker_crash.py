"""A worker SIGKILLed in the middle of an operation does not leave its key stuck: once the lease has run out, a
retry runs the operation on another worker (``uvicorn --workers 4`` sharing one SQLite file)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from idempo import SQLiteStore
from tests.support.processes import Server, run_server

from ._scenarios import retry_runs_once_the_lease_of_a_killed_worker_runs_out

pytestmark = pytest.mark.slow

LEASE = 2.0  # renewed every LEASE / 3 while the operation runs; after a crash, a retry may run LEASE later at most


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("e2e-crash"), lease=LEASE) as running:
        yield running


async def test_retry_runs_again_once_the_lease_of_a_killed_worker_runs_out(server: Server) -> None:
    store = SQLiteStore(server.db_path)
    try:
        await retry_runs_once_the_lease_of_a_killed_worker_runs_out(server, store, prefix="", lease=LEASE)
    finally:
        await store.close()
