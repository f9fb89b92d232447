"""A memory store under real uvicorn processes: under ``--workers 2`` each worker refuses new keys (503, and the log
says why), so fifty identical requests never run twice; under one worker, and in the child of ``uvicorn --reload``
(before and after a reload), fifty identical requests run once and nothing is refused."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Server, events, poll, run_server

pytestmark = pytest.mark.slow

REFUSAL = "memory store refuses new keys"
CONCURRENCY = 50


async def fifty_identical_requests(server: Server) -> tuple[str, list[httpx.Response]]:
    """Fifty identical keyed ``POST /charge/<name>`` at once, each on a connection of its own (so that the listening
    socket spreads them over the workers); the operation's name and the answers."""
    name = f"memory-{uuid.uuid4().hex[:12]}"
    headers = {"Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0, limits=limits) as client:
        answers = await asyncio.gather(
            *(client.post(f"/charge/{name}", content=b'{"amount": 1}', headers=headers) for _ in range(CONCURRENCY))
        )
    return name, list(answers)


def assert_ran_once(server: Server, name: str, answers: list[httpx.Response]) -> None:
    assert {answer.status_code for answer in answers} <= {200, 409}, [a.text for a in answers if a.status_code >= 500]
    assert [what for what, _ in events(server, name)] == ["start", "done"]
    assert len({answer.json()["charge_id"] for answer in answers if answer.status_code == 200}) == 1
    assert REFUSAL not in server.log()


async def test_two_workers_refuse_new_keys_so_nothing_runs_twice(tmp_path: Path) -> None:
    with run_server(tmp_path, lease=30.0, store_url="memory://", workers=2) as server:
        name, answers = await fifty_identical_requests(server)
        assert {answer.status_code for answer in answers} == {503}
        assert all(answer.json()["type"] == "urn:idempo:problem:store-unavailable" for answer in answers)
        assert events(server, name) == []
        log = server.log()
        for pid in {int(answer.headers["x-worker-pid"]) for answer in answers}:
            assert f"{REFUSAL}: process {pid} is one of several workers" in log
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
            assert (await client.get("/health")).status_code == 200  # requests without a key are served as ever


async def test_one_worker_runs_fifty_identical_requests_once(tmp_path: Path) -> None:
    with run_server(tmp_path, lease=30.0, store_url="memory://", workers=1) as server:
        name, answers = await fifty_identical_requests(server)
        assert_ran_once(server, name, answers)


async def test_the_child_of_uvicorn_reload_is_not_flagged_before_or_after_a_reload(tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "module.py").write_text("VERSION = 1\n")
    with run_server(tmp_path, lease=30.0, store_url="memory://", reload_dir=watched) as server:
        name, answers = await fifty_identical_requests(server)
        assert_ran_once(server, name, answers)
        (first,) = server.worker_pids()
        (watched / "module.py").write_text("VERSION = 2\n")
        await poll(lambda: server.live_worker_pids() - {first}, what="the reloaded child", within=30)
        name, answers = await fifty_identical_requests(server)
        assert_ran_once(server, name, answers)
        assert {int(answer.headers["x-worker-pid"]) for answer in answers} == server.live_worker_pids() - {first}
