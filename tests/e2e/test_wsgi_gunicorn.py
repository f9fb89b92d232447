"""End to end for the WSGI middleware: real gunicorn processes (``tests.support.gunicorn``) serving
``tests.e2e.wsgi_app`` over TCP, their keyed POSTs counted in a business database (a SQLite file every worker writes
to), on SQLite, Redis and PostgreSQL stores, with sync workers, gthread workers and sync workers under ``--preload``
(the app and its store built in gunicorn's master, before the fork).

- forty identical requests at once run the operation once (one row); every other answer is a 409, or, with
  ``on_conflict="wait"``, a replay;
- a worker SIGKILLed inside the app leaves its key in progress (409) until its lease runs out, then a retry runs;
- a request that runs longer than its lease keeps its key (the lease is renewed from the worker's thread);
- with Redis down, a keyed request is a 503 problem with ``Retry-After``, and unkeyed requests still work;
- a worker that exits while it is still trying to record an outcome the store failed to take waits for it
  (``finish_recording`` from gunicorn's ``worker_exit`` hook).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import Record, State
from idempo.stores import SyncStore, sync_store_from_url
from tests.support.environment import with_options
from tests.support.gunicorn import FINISH_RECORDING_ENV, Gunicorn, run_gunicorn
from tests.support.processes import lines, poll, store_key, wait_for_done
from tests.support.redis_cluster import RedisServer
from tests.support.stores import drop_table, new_table

from .wsgi_app import count_rows

pytestmark = pytest.mark.slow

APP = "tests.e2e.wsgi_app:create_app()"
CONCURRENCY = 40
BODY = b'{"amount": 1999, "currency": "eur"}'
SHORT_LEASE = 2.0  # of the paths under /short/: renewed every SHORT_LEASE / 3 while the app runs
WORKER_KINDS: dict[str, dict[str, Any]] = {
    "sync": {"workers": 4, "worker_class": "sync", "threads": 1},
    "gthread": {"workers": 2, "worker_class": "gthread", "threads": 4},
    # The app (and its store) built once in gunicorn's master, before it forks the workers.
    "sync-preload": {"workers": 4, "worker_class": "sync", "threads": 1, "extra_args": ("--preload",)},
}


@dataclass(frozen=True)
class Served:
    """A gunicorn serving the WSGI app, its shared directory, its business database and its store's URL."""

    gunicorn: Gunicorn
    side_dir: Path
    db: Path
    store_url: str
    workers: int
    threads: int

    @property
    def busy_at_least(self) -> int:
        """How many of forty requests sent at once are surely inside the app together while one holds the key.
        Sync workers take one connection each, so every worker holds one. A gthread worker accepts connections as
        they come and queues them for its threads, so one worker may have taken all forty: only its threads are
        sure to be busy (and the other requests may all be answered by that one process)."""
        return self.workers if self.threads == 1 else self.threads

    @property
    def base_url(self) -> str:
        return self.gunicorn.base_url

    def started(self, name: str) -> list[int]:
        """The pids of the workers in which ``POST .../orders/<name>`` entered the app, in order."""
        return [int(pid) for pid in lines(self.side_dir / f"{name}.started")]

    def rows(self, name: str) -> int:
        return count_rows(self.db, name)


@contextmanager
def serve(
    directory: Path,
    store_url: str,
    *,
    workers: int,
    worker_class: str,
    threads: int,
    extra_args: tuple[str, ...] = (),
) -> Iterator[Served]:
    side_dir = directory / "side"
    side_dir.mkdir()
    db = directory / "business.db"
    env = {
        "WSGI_E2E_STORE": store_url,
        "WSGI_E2E_DB": str(db),
        "WSGI_E2E_DIR": str(side_dir),
        "WSGI_E2E_LEASE": "30",
        "WSGI_E2E_SHORT_LEASE": str(SHORT_LEASE),
    }
    with run_gunicorn(
        APP, workers=workers, worker_class=worker_class, threads=threads, env=env, extra_args=extra_args
    ) as gunicorn:
        try:
            yield Served(gunicorn, side_dir, db, store_url, workers, threads)
        finally:
            for hold in side_dir.glob("*.hold"):
                hold.unlink(missing_ok=True)  # a failed test releases what it held, so that workers stop at once


def _headers(key: str, tag: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "X-E2E-Tag": tag, "Content-Type": "application/json"}


def _client(served: Served) -> httpx.AsyncClient:
    # One connection per request in flight, so that the listening socket hands them to several workers.
    limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY + 10)
    return httpx.AsyncClient(base_url=served.base_url, timeout=30.0, limits=limits)


async def _cancel(tasks: list[asyncio.Task[httpx.Response]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- forty identical requests at once, on every store and both worker kinds ------------------------------------------


@pytest.fixture(
    scope="module",
    params=[
        pytest.param((kind, store), id=f"{kind}-{store}")
        for kind in WORKER_KINDS
        for store in ("sqlite", "redis", "postgres")
        if (kind, store) != ("sync-preload", "postgres")  # see test_postgres_store_opened_before_the_fork_...
    ],
)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    kind, store = request.param
    directory = tmp_path_factory.mktemp(f"wsgi-{kind}-{store}")
    table = postgres_url = None
    if store == "sqlite":
        url = f"sqlite:///{directory / 'idempo.db'}"
    elif store == "redis":
        url = with_options(request.getfixturevalue("redis_url"), prefix=f"wsgi-e2e-{uuid.uuid4().hex}:")
    else:
        table, postgres_url = new_table(), request.getfixturevalue("postgres_url")
        url = with_options(postgres_url, table=table)
    try:
        with serve(directory, url, **WORKER_KINDS[kind]) as running:
            yield running
    finally:
        if table is not None and postgres_url is not None:
            drop_table(postgres_url, table)


async def test_forty_identical_requests_run_once_and_the_others_get_409(served: Served) -> None:
    name = f"reject-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/orders/{name}"
    hold = served.side_dir / f"{name}.hold"
    hold.touch()  # the first execution waits inside the app, so that every other request meets it in progress
    async with _client(served) as client:
        tasks = [
            asyncio.create_task(client.post(path, content=BODY, headers=_headers(key, name)))
            for _ in range(CONCURRENCY)
        ]
        try:
            await wait_for_done(tasks, CONCURRENCY - 1, within=30.0)
            assert len(served.started(name)) == 1
            assert served.rows(name) == 0  # the one execution is still held
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            await _cancel(tasks)

        statuses = [response.status_code for response in responses]
        assert sorted(statuses) == [201] + [409] * (CONCURRENCY - 1), statuses
        assert served.rows(name) == 1
        (runner,) = served.started(name)
        (original,) = [response for response in responses if response.status_code == 201]
        assert "idempotent-replayed" not in original.headers
        assert original.json()["pid"] == runner == int(original.headers["x-worker-pid"])
        assert original.json()["key"] == key
        assert original.json()["body"] == BODY.decode()
        for conflict in (response for response in responses if response.status_code == 409):
            assert conflict.headers["content-type"] == "application/problem+json"
            assert conflict.json()["type"] == "urn:idempo:problem:in-progress"
            assert int(conflict.headers["retry-after"]) >= 1
        answered_by = {int(response.headers["x-worker-pid"]) for response in responses}
        assert answered_by <= served.gunicorn.worker_pids()
        if served.threads == 1:  # sync: the runner's worker is taken, so the 409s came from other processes
            assert len(answered_by) >= 2, answered_by

        replay = await client.post(path, content=BODY, headers=_headers(key, name))
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == original.content
        assert served.rows(name) == 1


async def test_forty_identical_requests_wait_and_all_get_the_one_response(served: Served) -> None:
    name = f"wait-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/wait/orders/{name}"
    hold = served.side_dir / f"{name}.hold"
    arrivals = served.side_dir / f"{name}.arrivals"
    hold.touch()
    async with _client(served) as client:
        tasks = [
            asyncio.create_task(client.post(path, content=BODY, headers=_headers(key, name)))
            for _ in range(CONCURRENCY)
        ]
        try:
            # One request runs the operation, others wait for it inside the app (the rest are queued).
            busy = served.busy_at_least
            await poll(lambda: len(lines(arrivals)) >= busy, what=f"{busy} requests to arrive")
            await poll(partial(served.started, name), what="the operation to start")
            assert not any(task.done() for task in tasks)  # with on_conflict="wait", nobody is answered yet
            if served.threads == 1:  # sync: waiting in worker processes that do not run the operation
                assert len(set(lines(arrivals))) == served.workers
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            await _cancel(tasks)

    assert [response.status_code for response in responses] == [201] * CONCURRENCY
    assert served.rows(name) == 1
    assert len(served.started(name)) == 1
    assert len({response.content for response in responses}) == 1
    replayed = [response.headers.get("idempotent-replayed") for response in responses]
    assert replayed.count("true") == CONCURRENCY - 1
    assert replayed.count(None) == 1


async def test_postgres_store_opened_before_the_fork_serves_every_worker(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    table = new_table()
    url = with_options(postgres_url, table=table)
    try:
        with serve(tmp_path_factory.mktemp("wsgi-preload-postgres"), url, **WORKER_KINDS["sync-preload"]) as served:
            async with httpx.AsyncClient(base_url=served.base_url, timeout=30.0) as client:
                # A first request is held inside the app, so its (sync) worker is taken and the second, a new key,
                # must be served by another worker: two forked workers use the store the master opened.
                held = f"preload-{uuid.uuid4().hex}"
                hold = served.side_dir / f"{held}.hold"
                hold.touch()
                first = asyncio.create_task(
                    client.post(f"/orders/{held}", content=BODY, headers=_headers(str(uuid.uuid4()), held))
                )
                try:
                    await poll(partial(served.started, held), what="the first request to start")
                    other = f"preload-{uuid.uuid4().hex}"
                    second = await client.post(
                        f"/orders/{other}", content=BODY, headers=_headers(str(uuid.uuid4()), other)
                    )
                    hold.unlink()
                    responses = [await first, second]
                finally:
                    hold.unlink(missing_ok=True)
                    await _cancel([first])
                assert [response.status_code for response in responses] == [201, 201], [r.text for r in responses]
                answered_by = {int(response.headers["x-worker-pid"]) for response in responses}
                assert len(answered_by) == 2, answered_by
                assert served.rows(held) == served.rows(other) == 1
    finally:
        drop_table(postgres_url, table)


# -- a worker killed inside the app, a request longer than its lease (SQLite, sync workers) --------------------------


@pytest.fixture(scope="module")
def sqlite_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("wsgi-leases")
    url = f"sqlite:///{directory / 'idempo.db'}"
    with serve(directory, url, workers=3, worker_class="sync", threads=1) as running:
        yield running


@pytest.fixture
def store(sqlite_served: Served) -> Iterator[SyncStore]:
    """The workers' store, opened by the test to read the lease."""
    opened = sync_store_from_url(sqlite_served.store_url)
    try:
        yield opened
    finally:
        opened.close()


def _in_progress(store: SyncStore, key: str) -> Record:
    record = store.get(store_key(key))
    assert record is not None
    assert record.state is State.IN_PROGRESS
    return record


async def test_a_killed_workers_key_is_409_until_its_lease_runs_out_then_a_retry_runs(
    sqlite_served: Served, store: SyncStore
) -> None:
    served = sqlite_served
    name = f"crash-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/short/orders/{name}"
    headers = _headers(key, name)
    hold = served.side_dir / f"{name}.hold"
    hold.touch()  # the first execution stays inside the app until its worker is killed
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30.0) as client:
        first = asyncio.create_task(client.post(path, content=BODY, headers=headers))
        try:
            (victim,) = await poll(partial(served.started, name), what="the operation to start")
            assert victim in served.gunicorn.worker_pids()  # one of our gunicorn's workers, never anything else
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                await first  # its worker died under it: no response
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            hold.unlink(missing_ok=True)  # the retry's execution does not wait
        lease_expires_at = _in_progress(store, key).lease_expires_at

        immediate = await client.post(path, content=BODY, headers=headers)
        assert time.time() < lease_expires_at, "the retry came too late to see the lease held; raise the lease"
        assert immediate.status_code == 409, immediate.text
        assert immediate.json()["type"] == "urn:idempo:problem:in-progress"
        assert 1 <= int(immediate.headers["retry-after"]) <= SHORT_LEASE
        assert served.rows(name) == 0

        deadline = time.monotonic() + 15.0
        while (retry := await client.post(path, content=BODY, headers=headers)).status_code == 409:
            assert time.monotonic() < deadline, "the key stayed in progress 15 s after its lease should have run out"
            await asyncio.sleep(0.1)  # a client honouring Retry-After, faster: polling the lease's end
        assert retry.status_code == 201, retry.text
        assert time.time() >= lease_expires_at
        assert "idempotent-replayed" not in retry.headers
        assert retry.json()["pid"] != victim
        assert served.started(name) == [victim, retry.json()["pid"]]
        assert served.rows(name) == 1  # the killed execution wrote nothing; the retry, one row

        replay = await client.post(path, content=BODY, headers=headers)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == retry.content
        assert served.rows(name) == 1


async def test_a_request_longer_than_its_lease_keeps_its_key(sqlite_served: Served, store: SyncStore) -> None:
    served = sqlite_served
    name = f"long-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/short/orders/{name}"
    headers = _headers(key, name)
    hold = served.side_dir / f"{name}.hold"
    hold.touch()
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30.0) as client:
        first = asyncio.create_task(client.post(path, content=BODY, headers=headers))
        try:
            await poll(partial(served.started, name), what="the operation to start")
            claimed = _in_progress(store, key)
            past = claimed.created_at + 1.5 * SHORT_LEASE

            def renewed_past_one_and_a_half_leases() -> bool:
                record = _in_progress(store, key)
                return time.time() > past and record.lease_expires_at > claimed.lease_expires_at

            await poll(renewed_past_one_and_a_half_leases, what="1.5 leases with the lease renewed", within=20.0)
            assert time.time() > claimed.lease_expires_at  # the first lease alone would have run out by now
            retry = await client.post(path, content=BODY, headers=headers)
            assert retry.status_code == 409, retry.text  # still owned: no second run
            assert retry.json()["type"] == "urn:idempo:problem:in-progress"
            assert not first.done()
            hold.unlink()
            response = await first
        finally:
            hold.unlink(missing_ok=True)
            await _cancel([first])

    assert response.status_code == 201, response.text
    assert "idempotent-replayed" not in response.headers
    assert len(served.started(name)) == 1
    assert served.rows(name) == 1


async def test_a_chunked_body_through_gunicorn_is_the_same_request_as_a_sized_one(sqlite_served: Served) -> None:
    # gunicorn hands a chunked body to the app with wsgi.input_terminated and no Content-Length.
    served = sqlite_served
    name = f"chunked-{uuid.uuid4().hex}"
    headers = _headers(str(uuid.uuid4()), name)
    path = f"/orders/{name}"

    async def chunks() -> AsyncIterator[bytes]:
        yield BODY[:10]
        yield BODY[10:]

    async with httpx.AsyncClient(base_url=served.base_url, timeout=30.0) as client:
        chunked = await client.post(path, content=chunks(), headers=headers)
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        assert chunked.status_code == 201, chunked.text
        assert chunked.json()["body"] == BODY.decode()  # the app read the whole body

        sized = await client.post(path, content=BODY, headers=headers)  # the same request, with Content-Length
        assert sized.headers["idempotent-replayed"] == "true"
        assert sized.content == chunked.content

        other = await client.post(path, content=b'{"amount": 1}', headers=headers)
        assert other.status_code == 422, other.text

    assert served.rows(name) == 1


# -- Redis down -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["killed", "paused"])
async def test_redis_down_is_a_503_for_keyed_requests_and_unkeyed_ones_still_work(
    private_redis: RedisServer, tmp_path: Path, outage: str
) -> None:
    # killed: connections are refused at once; paused (SIGSTOP): the kernel still accepts them, and nothing answers
    # until the store's timeout (1 s here).
    url = with_options(private_redis.url, prefix="wsgi-e2e:", timeout=1, connect_timeout=1)
    with serve(tmp_path, url, workers=2, worker_class="sync", threads=1) as served:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=30.0) as client:
            name = f"up-{uuid.uuid4().hex}"
            before = await client.post(f"/orders/{name}", content=BODY, headers=_headers(str(uuid.uuid4()), name))
            assert before.status_code == 201, before.text  # the store answers: the app runs

            if outage == "killed":
                private_redis.kill()
            else:
                private_redis.pause()
            name = f"down-{uuid.uuid4().hex}"
            for _ in range(2):  # fresh keys, each on a new connection
                down = await client.post(
                    f"/orders/{name}",
                    content=BODY,
                    headers={**_headers(str(uuid.uuid4()), name), "Connection": "close"},
                )
                assert down.status_code == 503, down.text
                assert down.headers["content-type"] == "application/problem+json"
                assert down.json()["type"] == "urn:idempo:problem:store-unavailable"
                assert int(down.headers["retry-after"]) >= 1
            assert served.rows(name) == 0  # fail-closed: the app never ran
            assert served.started(name) == []

            health = await client.get("/health")
            assert health.status_code == 200
            unkeyed = await client.post(f"/orders/{name}", content=BODY)  # no key: the store is not asked
            assert unkeyed.status_code == 201, unkeyed.text
            assert served.rows(name) == 1


# -- a worker exits while an outcome is still being recorded ---------------------------------------------------------


async def test_a_worker_that_exits_while_an_outcome_is_being_recorded_waits_for_it(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis stops answering (SIGSTOP) while the app runs: the completion fails after the store's timeout, the
    client gets its 201, and a thread keeps trying to record the outcome. gunicorn is then stopped (SIGTERM): the
    worker's ``worker_exit`` hook calls ``finish_recording``, which waits; once Redis answers again (SIGCONT), the
    outcome lands and the worker exits. The record is completed: a retry would replay it, not run the order again.
    (Without the hook the thread would die with the worker, leaving the key in progress until its lease ran out.)"""
    url = with_options(private_redis.url, prefix="wsgi-e2e:", timeout=0.5, connect_timeout=1)
    name, key = f"exit-{uuid.uuid4().hex}", str(uuid.uuid4())
    side_dir = tmp_path / "side"
    side_dir.mkdir()
    env = {
        "WSGI_E2E_STORE": url,
        "WSGI_E2E_DB": str(tmp_path / "business.db"),
        "WSGI_E2E_DIR": str(side_dir),
        "WSGI_E2E_LEASE": "60",
        FINISH_RECORDING_ENV: "30",
    }
    hold = side_dir / f"{name}.hold"
    hold.touch()
    try:
        with run_gunicorn(APP, workers=1, env=env, extra_args=("--graceful-timeout", "40")) as gunicorn:
            async with httpx.AsyncClient(base_url=gunicorn.base_url, timeout=30.0) as client:
                first = asyncio.create_task(client.post(f"/orders/{name}", content=BODY, headers=_headers(key, name)))
                await poll(partial(lines, side_dir / f"{name}.started"), what="the app to start")
                private_redis.pause()
                hold.unlink()
                response = await first
                assert response.status_code == 201, response.text
            await poll(lambda: "could not record the outcome" in gunicorn.log(), what="the completion to fail")
            gunicorn.process.send_signal(signal.SIGTERM)
            await poll(lambda: "outcome(s) still being recorded" in gunicorn.log(), what="the worker to wait")
            private_redis.resume()
            await asyncio.to_thread(gunicorn.process.wait, 60)
            log = gunicorn.log()
        assert "recorded after the store came back" in log, log
        store = sync_store_from_url(url)
        try:
            record = store.get(store_key(key))
        finally:
            store.close()
        assert record is not None, log
        assert record.state is State.COMPLETED
        assert count_rows(tmp_path / "business.db", name) == 1
    finally:
        hold.unlink(missing_ok=True)
        private_redis.resume()
