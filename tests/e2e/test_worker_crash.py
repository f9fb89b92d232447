"""A worker SIGKILLed in the middle of an operation does not leave its key stuck: once the lease has run out, a
retry runs the operation on another worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from functools import partial

import httpx
import pytest

from idempo import SQLiteStore, State, principal_digest

from ._support import Server, events, poll, run_server

pytestmark = pytest.mark.slow

LEASE = 2.0  # renewed every LEASE / 3 while the operation runs; after a crash, a retry may run LEASE later at most
BODY = b'{"amount": 500, "currency": "usd"}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("e2e-crash"), lease=LEASE) as running:
        yield running


async def _lease_expiry(server: Server, key: str) -> float:
    """When the lease of *key* (no Authorization header: the empty principal) runs out, read from the store."""
    store = SQLiteStore(server.db_path)
    try:
        record = await store.get(f"{principal_digest(b'')}:{key}")
    finally:
        await store.close()
    assert record is not None
    assert record.state is State.IN_PROGRESS
    return record.lease_expires_at


async def test_retry_runs_again_once_the_lease_of_a_killed_worker_runs_out(server: Server) -> None:
    name = f"crash-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/charge/{name}"
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    hold = server.side_dir / f"{name}.hold"
    hold.touch()  # the first execution "works" until its worker is killed
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0) as client:
        first = asyncio.create_task(client.post(path, content=BODY, headers=headers))
        try:
            started = await poll(partial(events, server, name), what="the operation to start")
            victim = started[0][1]
            assert victim in server.worker_pids()  # one of our uvicorn's workers, never anything else
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                await first  # its worker died under it: no response
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        hold.unlink()  # a retry's execution does not hold
        lease_expires_at = await _lease_expiry(server, key)

        # At once: the dead worker's lease is still honoured.
        immediate = await client.post(path, content=BODY, headers=headers)
        assert time.time() < lease_expires_at, "the retry came too late to see the lease held; raise LEASE"
        assert immediate.status_code == 409
        assert immediate.json()["type"] == "urn:idempo:problem:in-progress"
        assert 1 <= int(immediate.headers["retry-after"]) <= LEASE

        # Once the lease has run out, a retry takes the key over and runs the operation.
        deadline = time.monotonic() + 15.0
        while True:
            retry = await client.post(path, content=BODY, headers=headers)
            if retry.status_code != 409:
                break
            assert "retry-after" in retry.headers
            assert time.monotonic() < deadline, "the key stayed in progress 15 s after its worker was killed"
            await asyncio.sleep(0.1)  # polling the other processes' view of the lease
        assert retry.status_code == 200, retry.text
        assert time.time() >= lease_expires_at
        assert "idempotent-replayed" not in retry.headers
        runner = retry.json()["pid"]
        assert runner != victim
        assert runner == int(retry.headers["x-worker-pid"])
        # Two executions started, the killed one never finished.
        assert events(server, name) == [("start", victim), ("start", runner), ("done", runner)]

        # And from then on, the retry's response is replayed.
        replay = await client.post(path, content=BODY, headers=headers)
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == retry.content
        assert len(events(server, name)) == 3
