"""End to end on PostgreSQL: ``uvicorn --workers 4`` over TCP, its workers sharing a table of the local server
(``postgres_url``): a table unique to this module, dropped at teardown, and an ``application_name`` of its own, so
that the test terminates the workers' connections and nobody else's. The unreachable-server test puts a TCP proxy
of the test's own between the workers and the server, and cuts it. Without a server the module skips; under
``CI=true`` it fails instead."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg import sql

from idempo import Store, store_from_url
from tests.support.processes import WORKERS, Server, TcpProxy, events, poll, poll_async, run_server, store_key

from ._scenarios import (
    BODY,
    Traffic,
    execute_once_across_workers,
    retry_runs_once_the_lease_of_a_killed_worker_runs_out,
    stale_owner_cannot_overwrite_the_new_owner,
    store_outage_while_requests_flow,
    wait_and_all_get_the_one_response,
)

pytestmark = pytest.mark.slow

SHORT_LEASE = 2.0  # of the paths under /short/: after a crash, a retry runs at most this long after the last renewal
TERMINATIONS = 3  # rounds of pg_terminate_backend while requests flow


@dataclass(frozen=True)
class Postgres:
    url: str  # the server's, as the suite was given it
    table: str
    application_name: str  # of the workers' connections

    def store_url(self, url: str | None = None, **options: object) -> str:
        """*url* (the server's by default) with the table, the workers' application_name and *options*."""
        options = {"table": self.table, "application_name": self.application_name, **options}
        base = url or self.url
        return base + ("&" if "?" in base else "?") + "&".join(f"{name}={value}" for name, value in options.items())


@pytest.fixture(scope="module")
def postgres(postgres_url: str) -> Iterator[Postgres]:
    hex_id = uuid.uuid4().hex[:16]
    try:
        yield Postgres(postgres_url, f"idempo_e2e_{hex_id}", f"idempo-e2e-{hex_id}")
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"idempo_e2e_{hex_id}")))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("e2e-postgres")
    with run_server(directory, lease=30.0, store_url=postgres.store_url(), short_lease=SHORT_LEASE) as running:
        yield running


@pytest.fixture
async def store(postgres: Postgres) -> AsyncIterator[Store]:
    """The workers' table, through a store of the test's own (with another application_name, so that terminating
    the workers' connections leaves it alone)."""
    opened = store_from_url(postgres.store_url(), application_name=f"{postgres.application_name}-test")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def admin(postgres: Postgres) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(postgres.url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def test_fifty_concurrent_identical_requests_execute_once_across_workers(server: Server) -> None:
    await execute_once_across_workers(server)


async def test_fifty_concurrent_identical_requests_wait_and_all_get_the_one_response(server: Server) -> None:
    await wait_and_all_get_the_one_response(server)


async def test_retry_runs_again_once_the_lease_of_a_killed_worker_runs_out(server: Server, store: Store) -> None:
    await retry_runs_once_the_lease_of_a_killed_worker_runs_out(server, store, prefix="/short", lease=SHORT_LEASE)


async def test_stale_owner_cannot_overwrite_the_new_owner(server: Server, store: Store) -> None:
    await stale_owner_cannot_overwrite_the_new_owner(server, store)


def _answered(traffic: Traffic, count: int) -> bool:
    return len(traffic.exchanges) >= count


async def _terminate(admin: psycopg.AsyncConnection[Any], application_name: str) -> int:
    """Terminate the workers' connections (theirs only), and wait until each backend has exited; how many."""
    cursor = await admin.execute(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        [application_name],
    )
    rows = await cursor.fetchall()
    assert all(terminated for _, terminated in rows), rows
    pids = [pid for pid, _ in rows]

    async def gone() -> bool:
        cursor = await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids])
        return await cursor.fetchone() == (0,)

    await poll_async(gone, what="the terminated backends to exit")
    return len(pids)


async def _wait_for_a_lock_wait(admin: psycopg.AsyncConnection[Any], application_name: str) -> None:
    """Poll, with a deadline, until a statement of the workers waits for a row lock."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"

    async def waiting() -> bool:
        return await (await admin.execute(query, [application_name])).fetchone() == (1,)

    await poll_async(waiting, what="a claim to wait for the row lock")


async def test_backends_terminated_mid_traffic_then_requests_succeed(
    server: Server, postgres: Postgres, admin: psycopg.AsyncConnection[Any]
) -> None:
    """The workers' connections are terminated by the server, three times, while requests flow, while one
    operation runs, and while one claim waits for a row lock: only 200, 409 or 503, within a bound; nothing runs
    twice; a 503 only for a request in flight at a termination (and always for the one whose statement was cut);
    the running operation's response is recorded and replayed; new keys run and replay."""
    workers = await poll(
        lambda: server.live_worker_pids() if len(server.live_worker_pids()) >= WORKERS else None,
        what="every worker to be alive",
    )
    log_before = len(server.log())
    held_name = f"held-{uuid.uuid4().hex}"
    held_path = f"/charge/{held_name}"
    held_headers = {"Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"}
    hold = server.side_dir / f"{held_name}.hold"
    blocked_name = f"blocked-{uuid.uuid4().hex}"
    blocked_path = f"/charge/{blocked_name}"
    blocked_key = str(uuid.uuid4())
    blocked_headers = {"Idempotency-Key": blocked_key, "Content-Type": "application/json"}
    hold.touch()
    traffic = Traffic(server)
    terminations: list[tuple[float, float, int]] = []
    locker = await psycopg.AsyncConnection.connect(postgres.url)  # a transaction of its own, left open
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0) as client:
        held = asyncio.create_task(client.post(held_path, content=BODY, headers=held_headers))
        blocked: asyncio.Task[httpx.Response] | None = None
        try:
            await poll(lambda: events(server, held_name), what="the held operation to start")
            traffic.start()
            for round_ in range(TERMINATIONS):
                await poll(partial(_answered, traffic, len(traffic.exchanges) + 20), what="requests to flow")
                if round_ == 0:
                    # A claim that waits for the row lock of an uncommitted insert of its key: its statement is
                    # certainly running when its connection is terminated.
                    await locker.execute(
                        sql.SQL(
                            "INSERT INTO {} (key, state, fingerprint, token, created_at, lease_expires_at, expires_at)"
                            " VALUES (%s, 0, 'locker', 'locker', 0, 0, 0)"
                        ).format(sql.Identifier(postgres.table)),
                        [store_key(blocked_key)],
                    )
                    blocked = asyncio.create_task(client.post(blocked_path, content=BODY, headers=blocked_headers))
                    await _wait_for_a_lock_wait(admin, postgres.application_name)
                started = time.monotonic()
                count = await _terminate(admin, postgres.application_name)
                terminations.append((started, time.monotonic(), count))
                if round_ == 0:
                    assert blocked is not None
                    async with asyncio.timeout(20):
                        blocked_response = await blocked
                    await locker.rollback()
            hold.unlink()
            async with asyncio.timeout(20):
                held_response = await held
            traffic.next_generation()
            await poll(
                lambda: (
                    traffic.count(generation=1, status=200, replayed=False) >= 5
                    and traffic.count(generation=1, status=200, replayed=True) >= 5
                ),
                what="new keys to run and replay after the terminations",
            )
            held_replay = await client.post(held_path, content=BODY, headers=held_headers)
            blocked_retry = await client.post(blocked_path, content=BODY, headers=blocked_headers)
            blocked_replay = await client.post(blocked_path, content=BODY, headers=blocked_headers)
        finally:
            hold.unlink(missing_ok=True)
            await traffic.stop()
            for task in (held, blocked):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await locker.close()

    statuses = traffic.check()
    assert all(count >= 1 for _, _, count in terminations), terminations  # each round cut live connections
    # Only a request in flight while its connection was terminated may be refused; after that, the store notices
    # the closed connections before it uses them.
    for exchange in traffic.exchanges:
        during = any(exchange.sent_at < end and exchange.answered_at > start for start, end, _ in terminations)
        assert during or exchange.status in (200, 409), (exchange, terminations)
    # The claim whose statement was cut: a clean 503; nothing ran; its retry runs once, and then replays.
    assert blocked_response.status_code == 503, blocked_response.text
    assert blocked_response.headers["content-type"] == "application/problem+json"
    assert blocked_response.json()["type"] == "urn:idempo:problem:store-unavailable"
    assert int(blocked_response.headers["retry-after"]) >= 1
    assert blocked_retry.status_code == 200, blocked_retry.text
    assert "idempotent-replayed" not in blocked_retry.headers
    assert blocked_replay.status_code == 200
    assert blocked_replay.headers["idempotent-replayed"] == "true"
    assert blocked_replay.content == blocked_retry.content
    blocked_pid = int(blocked_retry.headers["x-worker-pid"])
    assert events(server, blocked_name) == [("start", blocked_pid), ("done", blocked_pid)]
    # The operation that ran across the terminations was recorded once it finished, and is replayed.
    assert held_response.status_code == 200, held_response.text
    held_pid = int(held_response.headers["x-worker-pid"])
    assert events(server, held_name) == [("start", held_pid), ("done", held_pid)]
    assert held_replay.status_code == 200, held_replay.text
    assert held_replay.headers["idempotent-replayed"] == "true"
    assert held_replay.content == held_response.content
    # The same processes throughout, and nothing went wrong in them.
    assert server.process.poll() is None
    assert server.live_worker_pids() == workers
    log = server.log()[log_before:]
    assert "Traceback" not in log, log
    assert statuses.get(200, 0) > 0


@pytest.fixture
def proxied_server(tmp_path: Path, postgres: Postgres) -> Iterator[tuple[Server, TcpProxy]]:
    """``uvicorn --workers 4`` whose store reaches the server through a proxy the test can cut. A short
    ``pool_timeout``, so that a request waits that long for a connection while the server is unreachable; a short
    ``reconnect_timeout``, so that the pool tries again soon once it is back."""
    parts = urlsplit(postgres.url)
    with TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy:
        netloc = parts.netloc
        credentials = netloc.rpartition("@")[0]
        through = postgres.url.replace(netloc, f"{credentials}{'@' if credentials else ''}127.0.0.1:{proxy.port}", 1)
        url = postgres.store_url(through, pool_timeout=2, reconnect_timeout=1)
        with run_server(tmp_path, lease=30.0, store_url=url) as running:
            yield running, proxy


async def test_unreachable_server_is_503_then_recovers_without_restarting_uvicorn(
    proxied_server: tuple[Server, TcpProxy],
) -> None:
    server, proxy = proxied_server
    outage = await store_outage_while_requests_flow(
        server, break_store=proxy.cut, repair_store=proxy.restore, what="PostgreSQL is unreachable"
    )
    # The operation that was running when the server became unreachable could not record its response then; the
    # middleware kept trying while its lease (30 s) lasted, so once the server is back the outcome lands: a retry
    # gets 409 until it has, then the original response, replayed. Never a second execution.
    headers = {"Idempotency-Key": outage.held_key, "Content-Type": "application/json"}
    deadline = time.monotonic() + 20.0
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0) as client:
        while True:
            retry = await client.post(outage.held_path, content=BODY, headers=headers)
            if retry.status_code != 409:
                break
            assert retry.json()["type"] == "urn:idempo:problem:in-progress"
            assert time.monotonic() < deadline, "the lost completion was not recorded after the server came back"
            await asyncio.sleep(0.1)
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == outage.held_response.content
