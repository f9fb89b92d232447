"""Fifty identical requests at once, against ``uvicorn --workers 4`` sharing one SQLite file: one execution."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from ._support import Server, events, lines, poll, run_server, wait_for_done

pytestmark = pytest.mark.slow

CONCURRENCY = 50
BODY = b'{"amount": 1999, "currency": "eur"}'
MAX_EXTRA = 40  # new connections tried, at most, to reach a second worker


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("e2e-concurrency"), lease=30.0) as running:
        yield running


def _headers(key: str, tag: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "X-E2E-Tag": tag, "Content-Type": "application/json"}


def _client(server: Server) -> httpx.AsyncClient:
    # One connection per request in flight, so that the listening socket hands them to several workers.
    limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY + 10)
    return httpx.AsyncClient(base_url=server.base_url, timeout=20.0, limits=limits)


def _arrived(arrivals_file: Path, count: int) -> bool:
    """Whether *count* requests have arrived (a probe for :func:`poll`)."""
    return len(lines(arrivals_file)) >= count


async def _cancel(tasks: list[asyncio.Task[httpx.Response]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _conflicts_from_another_worker(
    server: Server, path: str, key: str, name: str, tasks: list[asyncio.Task[httpx.Response]]
) -> list[httpx.Response]:
    """While the operation is held, make sure 409s came from at least two workers (so at least one is not the
    worker running it): if the listening socket happened to hand the fifty connections to one worker, send more
    identical requests, each on a new connection, until another worker answers one. Returns those extra answers."""
    pids = {int(task.result().headers["x-worker-pid"]) for task in tasks if task.done()}
    extra: list[httpx.Response] = []
    while len(pids) < 2:
        assert len(extra) < MAX_EXTRA, f"{len(extra)} more requests on new connections all went to worker {pids}"
        async with _client(server) as fresh:
            response = await fresh.post(path, content=BODY, headers=_headers(key, name))
        assert response.status_code == 409, response.text
        extra.append(response)
        pids.add(int(response.headers["x-worker-pid"]))
    return extra


async def _waiters_in_another_worker(
    server: Server,
    path: str,
    key: str,
    name: str,
    tasks: list[asyncio.Task[httpx.Response]],
    fresh_clients: list[httpx.AsyncClient],
) -> None:
    """While the operation is held, make sure requests arrived at at least two workers (so at least one waits in a
    worker that does not run the operation): if not, add waiting requests, each on a new connection, to *tasks*."""
    arrivals_file = server.side_dir / f"{name}.arrivals"
    while len(set(lines(arrivals_file))) < 2:
        assert len(fresh_clients) < MAX_EXTRA, f"{len(fresh_clients)} more requests all went to one worker"
        fresh = _client(server)
        fresh_clients.append(fresh)
        tasks.append(asyncio.create_task(fresh.post(path, content=BODY, headers=_headers(key, name))))
        count = len(tasks)
        await poll(partial(_arrived, arrivals_file, count), what="one more request to arrive")


async def test_fifty_concurrent_identical_requests_execute_once_across_workers(server: Server) -> None:
    name = f"reject-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/charge/{name}"
    hold = server.side_dir / f"{name}.hold"
    hold.touch()  # the first execution holds until we release it, so every other request meets it in progress
    async with _client(server) as client:
        tasks = [
            asyncio.create_task(client.post(path, content=BODY, headers=_headers(key, name)))
            for _ in range(CONCURRENCY)
        ]
        try:
            # Everyone but the owner of the key is answered while the operation is still running.
            await wait_for_done(tasks, CONCURRENCY - 1)
            assert [what for what, _ in events(server, name)] == ["start"]
            extra = await _conflicts_from_another_worker(server, path, key, name, tasks)
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            await _cancel(tasks)

        # Exactly one execution, in one of the workers, that ran to completion.
        recorded = events(server, name)
        assert len(recorded) == 2, recorded
        (started, runner), (finished, finisher) = recorded
        assert (started, finished) == ("start", "done")
        assert runner == finisher
        assert runner in server.worker_pids()

        originals = [response for response in responses if response.status_code == 200]
        conflicts = [response for response in responses if response.status_code == 409]
        assert len(originals) == 1, [response.status_code for response in responses]
        assert len(conflicts) == CONCURRENCY - 1, [response.status_code for response in responses]
        conflicts += extra
        original = originals[0]
        assert "idempotent-replayed" not in original.headers
        document = original.json()
        assert document["pid"] == runner == int(original.headers["x-worker-pid"])
        assert document["key"] == key
        assert document["request_body"] == BODY.decode()
        for conflict in conflicts:
            assert conflict.headers["content-type"] == "application/problem+json"
            assert conflict.json()["type"] == "urn:idempo:problem:in-progress"
            assert int(conflict.headers["retry-after"]) >= 1

        # The requests really were spread over several worker processes, and the 409s came from more than one.
        arrivals = {int(pid) for pid in lines(server.side_dir / f"{name}.arrivals")}
        answered_by = [int(response.headers["x-worker-pid"]) for response in responses]
        answered_by += [int(response.headers["x-worker-pid"]) for response in extra]
        assert len(lines(server.side_dir / f"{name}.arrivals")) == CONCURRENCY + len(extra)
        assert arrivals == set(answered_by)
        assert arrivals <= server.worker_pids()
        assert len({int(conflict.headers["x-worker-pid"]) for conflict in conflicts}) >= 2, answered_by

        # A retry after completion is a replay of the same bytes, and runs nothing.
        replay = await client.post(path, content=BODY, headers=_headers(key, name))
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == original.content
        assert len(events(server, name)) == 2


async def test_fifty_concurrent_identical_requests_wait_and_all_get_the_one_response(server: Server) -> None:
    name = f"wait-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/wait/charge/{name}"
    hold = server.side_dir / f"{name}.hold"
    arrivals_file = server.side_dir / f"{name}.arrivals"
    hold.touch()
    fresh_clients: list[httpx.AsyncClient] = []
    async with _client(server) as client:
        tasks = [
            asyncio.create_task(client.post(path, content=BODY, headers=_headers(key, name)))
            for _ in range(CONCURRENCY)
        ]
        try:
            await poll(partial(_arrived, arrivals_file, CONCURRENCY), what=f"{CONCURRENCY} requests to arrive")
            await poll(partial(events, server, name), what="the operation to start")
            await _waiters_in_another_worker(server, path, key, name, tasks, fresh_clients)
            # With on_conflict="wait", nobody is answered while the operation runs: they all wait for it.
            assert not any(task.done() for task in tasks)
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            await _cancel(tasks)
            for fresh in fresh_clients:
                await fresh.aclose()

    recorded = events(server, name)
    assert [what for what, _ in recorded] == ["start", "done"], recorded
    total = len(tasks)
    assert [response.status_code for response in responses] == [200] * total
    assert len({response.content for response in responses}) == 1
    replayed = [response.headers.get("idempotent-replayed") for response in responses]
    assert replayed.count("true") == total - 1
    assert replayed.count(None) == 1
    document = json.loads(responses[0].content)
    assert document["pid"] == recorded[0][1]
    assert document["key"] == key
    waiters = {int(pid) for pid in lines(arrivals_file)}
    assert len(waiters) >= 2, waiters
    assert waiters <= server.worker_pids()
