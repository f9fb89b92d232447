"""End to end on Redis: ``uvicorn --workers 4`` over TCP, its workers sharing a private ``redis-server`` that this
module starts on a free port (never the shared one on 6379), and that the last test kills and restarts on that
same port. Without redis-server the module skips; under ``CI=true`` it fails instead."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from idempo import State, Store, store_from_url
from tests.support.processes import Server, events, poll, run_server, store_key
from tests.support.redis_cluster import RedisServer

from ._scenarios import (
    execute_once_across_workers,
    retry_runs_once_the_lease_of_a_killed_worker_runs_out,
    stale_owner_cannot_overwrite_the_new_owner,
    store_outage_while_requests_flow,
    wait_and_all_get_the_one_response,
)

pytestmark = pytest.mark.slow

SHORT_LEASE = 2.0  # of the paths under /short/: after a crash, a retry runs at most this long after the last renewal


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("e2e-redis-server"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Server]:
    url = f"{redis_server.url}?prefix=idempo-e2e:"
    directory = tmp_path_factory.mktemp("e2e-redis")
    with run_server(directory, lease=30.0, store_url=url, short_lease=SHORT_LEASE) as running:
        yield running


@pytest.fixture
async def store(server: Server) -> AsyncIterator[Store]:
    """The workers' store, opened by the test itself."""
    opened = store_from_url(server.store_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_fifty_concurrent_identical_requests_execute_once_across_workers(server: Server) -> None:
    await execute_once_across_workers(server)


async def test_fifty_concurrent_identical_requests_wait_and_all_get_the_one_response(server: Server) -> None:
    await wait_and_all_get_the_one_response(server)


async def test_retry_runs_again_once_the_lease_of_a_killed_worker_runs_out(server: Server, store: Store) -> None:
    await retry_runs_once_the_lease_of_a_killed_worker_runs_out(server, store, prefix="/short", lease=SHORT_LEASE)


async def test_stale_owner_cannot_overwrite_the_new_owner(server: Server, store: Store) -> None:
    await stale_owner_cannot_overwrite_the_new_owner(server, store)


async def test_redis_killed_mid_traffic_is_503_then_recovers_without_restarting_uvicorn(
    server: Server, redis_server: RedisServer
) -> None:
    # SIGKILL: connections reset at once, as in a crash; then the same port again, empty (no persistence). The
    # record of an operation that ran before the kill is lost with it, so no key of before is ever sent again.
    await store_outage_while_requests_flow(
        server, break_store=redis_server.kill, repair_store=redis_server.start, what="Redis is down"
    )


async def test_a_request_cancelled_at_shutdown_while_its_outcome_is_recorded_keeps_it(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """uvicorn (one process) is told to stop while the completion of a request that ran waits for a Redis that
    does not answer (SIGSTOP); after ``--timeout-graceful-shutdown`` it cancels the request. The middleware makes
    the completion again in the background and hands the lifespan's shutdown to the app only once it has landed
    (Redis answers again, SIGCONT): the record is completed, so that a retry would replay it rather than run the
    operation a second time. Without that, the process would end with the outcome in its memory."""
    url = f"{private_redis.url}?prefix=idempo-e2e:&timeout=60"  # the reply waited for outlasts the grace period
    name, key = f"shutdown-{uuid.uuid4().hex}", str(uuid.uuid4())
    (tmp_path / "uvicorn").mkdir()
    with run_server(tmp_path / "uvicorn", lease=60.0, store_url=url, workers=1) as server:
        hold = server.side_dir / f"{name}.hold"
        hold.touch()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0) as client:
            first = asyncio.create_task(client.post(f"/charge/{name}", content=b"{}", headers={"Idempotency-Key": key}))
            try:
                await poll(partial(events, server, name), what="the operation to start")
                private_redis.pause()
                hold.unlink()
                await poll(lambda: len(events(server, name)) == 2, what="the operation to finish")
                server.process.send_signal(signal.SIGTERM)
                await poll(
                    lambda: "timeout graceful shutdown exceeded" in server.log(),
                    what="uvicorn to cancel the request",
                )
                private_redis.resume()
                # uvicorn ends by raising the signal it was stopped with again, once it has shut down
                assert await asyncio.to_thread(server.process.wait, 60) == -signal.SIGTERM, server.log()
            finally:
                private_redis.resume()
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
    store = store_from_url(url)
    try:
        record = await store.get(store_key(key))
    finally:
        await store.close()
    assert record is not None, server.log()
    assert record.state is State.COMPLETED
    assert [what for what, _ in events(server, name)] == ["start", "done"]
