"""End to end for ``idempo.transactions`` with SQLAlchemy: real uvicorn processes (``tests.support.uvicorn``: one
worker, restarted by the test as an orchestrator would, or ``--workers 4``, restarted by uvicorn's supervisor)
serving ``tests.e2e.tx_sqlalchemy_app`` over TCP, whose ``POST /charge/<name>`` inserts a ledger row in a
SQLAlchemy transaction, on PostgreSQL and on SQLite, with a sync ``Session`` and an ``AsyncSession``. A crash is the
worker's SIGKILL of itself, from a fault hook, right after the commit or right before it.

- bound (the response recorded in the transaction), a crash after the commit: the client gets no answer; its retry
  gets the original 201 replayed, body and all, and the ledger holds one row;
- plain (commit, then return: what every idempotency middleware does), the same crash: once the lease has run out,
  the retry runs the charge again: two rows. That is the gap the binding closes;
- bound, a crash before the commit: nothing happened (no row, the key not completed); once the lease has run out,
  the retry runs once;
- bound, forty requests at once under one key across four workers: one row, one 201, every other answer a 409.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from idempo import State, SyncStore
from idempo.transactions import store_for
from tests.support.processes import lines, store_key, wait_for_done
from tests.support.stores import drop_table, new_table
from tests.support.uvicorn import Uvicorn, run_uvicorn

from .tx_sqlalchemy_app import ledger_rows, ledger_table

pytestmark = pytest.mark.slow

APP = "tests.e2e.tx_sqlalchemy_app:create_app"
LEASE = 2.0  # short, so that a retry after a crash runs soon; renewed every LEASE / 3 while a charge runs
CONCURRENCY = 40
BODY = b'{"amount": 1999, "currency": "eur"}'
MAX_EXTRA = 40  # new connections tried, at most, to reach a second worker


@dataclass(frozen=True)
class Config:
    """One served application: its database, its session, its mode and how many uvicorn workers."""

    database: str  # sqlite | postgres
    session: str  # sync | async
    mode: str  # bound | plain
    workers: int

    def __str__(self) -> str:
        return f"{self.database}-{self.session}-{self.mode}-{self.workers}w"


@dataclass(frozen=True)
class Served:
    """A uvicorn serving the app, its shared directory, and a way to read its ledger and its store."""

    config: Config
    server: Uvicorn
    side_dir: Path
    engine: Engine
    ledger: str
    store: SyncStore

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def rows(self, name: str) -> list[tuple[int, int]]:
        """``(id, pid)`` of each ledger row of the charge *name*."""
        return ledger_rows(self.engine, self.ledger, name)

    def killed(self, name: str) -> list[int]:
        """The pids of the workers that killed themselves in the charge *name*."""
        return [int(pid) for pid in lines(self.side_dir / f"{name}.killed")]


class Servers:
    """The module's servers, each started on first use and stopped (its tables dropped) at the end."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self.directory = directory
        self.stack = stack
        self.running: dict[Config, Served] = {}

    def get(self, config: Config, postgres_url: str | None) -> Served:
        if config not in self.running:
            self.running[config] = self._start(config, postgres_url)
        served = self.running[config]
        served.server.wait_for_workers()  # whole again, if an earlier test killed a worker
        return served

    def _start(self, config: Config, postgres_url: str | None) -> Served:
        directory = self.directory / str(config)
        side_dir = directory / "side"
        side_dir.mkdir(parents=True)
        table, ledger = new_table(), new_table()
        if config.database == "sqlite":
            url = f"sqlite:///{directory / 'app.db'}"
        else:
            assert postgres_url is not None
            url = make_url(postgres_url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
            for name in (table, ledger):
                self.stack.callback(drop_table, postgres_url, name)  # after the server stopped (last in, first out)
        engine = create_engine(url)
        self.stack.callback(engine.dispose)
        ledger_table(ledger).create(engine)
        store = cast("SyncStore", store_for(engine, sync=True, table=table))  # the test's view of the records
        self.stack.callback(store.close)
        env = {
            "TX_E2E_DATABASE": url,
            "TX_E2E_SESSION": config.session,
            "TX_E2E_MODE": config.mode,
            "TX_E2E_TABLE": table,
            "TX_E2E_LEDGER": ledger,
            "TX_E2E_LEASE": str(LEASE),
            "TX_E2E_DIR": str(side_dir),
        }
        server = self.stack.enter_context(run_uvicorn(APP, workers=config.workers, env=env))
        return Served(config, server, side_dir, engine, ledger, store)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with ExitStack() as stack:
        yield Servers(tmp_path_factory.mktemp("tx-e2e"), stack)


@pytest.fixture
def served(request: pytest.FixtureRequest, servers: Servers) -> Served:
    config: Config = request.param
    postgres_url = request.getfixturevalue("postgres_url") if config.database == "postgres" else None
    return servers.get(config, postgres_url)


def _params(*configs: Config) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("served", [pytest.param(c, id=str(c)) for c in configs], indirect=True)


CRASHING = _params(Config("sqlite", "sync", "bound", 1), Config("postgres", "async", "bound", 4))
PLAIN = _params(Config("sqlite", "sync", "plain", 1), Config("postgres", "async", "plain", 4))
CONCURRENT = _params(Config("sqlite", "async", "bound", 4), Config("postgres", "async", "bound", 4))


def _headers(key: str, fault: str | None = None) -> dict[str, str]:
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    if fault is not None:
        headers["X-Fault"] = fault
    return headers


def _client(served: Served) -> httpx.AsyncClient:
    # One connection per request in flight, so that the listening socket hands them to several workers.
    limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY + 10)
    return httpx.AsyncClient(base_url=served.base_url, timeout=30.0, limits=limits)


def _fresh() -> tuple[str, str]:
    """A charge's name and an idempotency key no other test uses."""
    return f"charge-{uuid.uuid4().hex}", str(uuid.uuid4())


async def _crash(served: Served, name: str, key: str, fault: str) -> int:
    """POST the charge with *fault*: its worker kills itself and the client gets no answer. The dead worker's pid,
    once every worker serves again."""
    async with _client(served) as client:
        with pytest.raises(httpx.TransportError):
            await client.post(f"/charge/{name}", content=BODY, headers=_headers(key, fault))
    (killed,) = served.killed(name)
    served.server.recover()
    return killed


async def _after_the_lease(served: Served, name: str, key: str, *, within: float = 15.0) -> httpx.Response:
    """The retry of a key whose owner died: 409 (in progress) until its lease runs out, then whatever it is."""
    deadline = time.monotonic() + within
    async with _client(served) as client:
        while True:
            response = await client.post(f"/charge/{name}", content=BODY, headers=_headers(key))
            if response.status_code != 409:
                return response
            assert response.json()["type"] == "urn:idempo:problem:in-progress", response.text
            if time.monotonic() > deadline:
                raise AssertionError(f"the key was still in progress {within} s after the crash")
            await asyncio.sleep(0.05)  # a retry's pause: the lease runs out on the store's clock, not on an event


# -- a crash after the commit ----------------------------------------------------------------------------------------


@CRASHING
async def test_bound_crash_after_commit_replays_the_committed_response(served: Served) -> None:
    name, key = _fresh()
    killed = await _crash(served, name, key, "after-commit")
    ((row, pid),) = served.rows(name)  # the charge committed
    assert pid == killed
    stored = served.store.get(store_key(key))
    assert stored is not None
    assert stored.state is State.COMPLETED  # with it, in the same transaction

    async with _client(served) as client:
        retry = await client.post(f"/charge/{name}", content=BODY, headers=_headers(key))
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == {"name": name, "row": row, "pid": killed}  # the dead worker's answer, never sent before
    assert int(retry.headers["x-worker-pid"]) != killed
    assert served.rows(name) == [(row, killed)]


@PLAIN
async def test_plain_crash_after_commit_runs_the_charge_again(served: Served) -> None:
    """Without the binding the committed charge's response dies with the worker: once the lease has run out, the
    retry runs the charge a second time. This is the measured difference."""
    name, key = _fresh()
    killed = await _crash(served, name, key, "after-commit")
    assert [pid for _, pid in served.rows(name)] == [killed]
    stored = served.store.get(store_key(key))
    assert stored is None or stored.state is State.IN_PROGRESS  # nothing recorded (a lapsed lease reads as none)

    retry = await _after_the_lease(served, name, key)
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers
    rows = served.rows(name)
    assert len(rows) == 2, rows  # charged twice
    assert rows[1][1] == int(retry.headers["x-worker-pid"]) != killed


# -- a crash before the commit ---------------------------------------------------------------------------------------


@CRASHING
async def test_bound_crash_before_commit_leaves_nothing_and_the_retry_runs_once(served: Served) -> None:
    name, key = _fresh()
    killed = await _crash(served, name, key, "before-commit")
    assert served.rows(name) == []
    stored = served.store.get(store_key(key))
    assert stored is None or stored.state is State.IN_PROGRESS  # the completion rolled back with the row

    retry = await _after_the_lease(served, name, key)
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers
    ((row, pid),) = served.rows(name)
    assert retry.json() == {"name": name, "row": row, "pid": pid}
    assert pid == int(retry.headers["x-worker-pid"]) != killed

    async with _client(served) as client:
        again = await client.post(f"/charge/{name}", content=BODY, headers=_headers(key))
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == retry.content
    assert len(served.rows(name)) == 1


# -- forty requests at once under one key ----------------------------------------------------------------------------


async def _conflicts_from_another_worker(
    served: Served, name: str, key: str, answered: list[httpx.Response]
) -> list[httpx.Response]:
    """While the charge is held, make sure 409s came from at least two workers (so that one is not the worker running
    it): if the listening socket handed every connection to one worker, send more, each on a new connection."""
    pids = {int(response.headers["x-worker-pid"]) for response in answered}
    extra: list[httpx.Response] = []
    while len(pids) < 2:
        assert len(extra) < MAX_EXTRA, f"{len(extra)} more requests on new connections all went to worker {pids}"
        async with _client(served) as fresh:
            response = await fresh.post(f"/charge/{name}", content=BODY, headers=_headers(key))
        assert response.status_code == 409, response.text
        extra.append(response)
        pids.add(int(response.headers["x-worker-pid"]))
    return extra


@CONCURRENT
async def test_forty_requests_at_once_under_one_key_charge_once(served: Served) -> None:
    name, key = _fresh()
    hold = served.side_dir / f"{name}.hold"
    hold.touch()  # the first charge waits before its transaction, so that every other request meets it in progress
    async with _client(served) as client:
        tasks = [
            asyncio.create_task(client.post(f"/charge/{name}", content=BODY, headers=_headers(key)))
            for _ in range(CONCURRENCY)
        ]
        try:
            await wait_for_done(tasks, CONCURRENCY - 1, within=30.0)
            assert served.rows(name) == []  # the one charge is still held
            extra = await _conflicts_from_another_worker(served, name, key, [t.result() for t in tasks if t.done()])
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [201] + [409] * (CONCURRENCY - 1), statuses
        ((row, pid),) = served.rows(name)
        (original,) = [response for response in responses if response.status_code == 201]
        assert "idempotent-replayed" not in original.headers
        assert original.json() == {"name": name, "row": row, "pid": pid}
        assert pid == int(original.headers["x-worker-pid"])
        for conflict in [response for response in responses if response.status_code == 409] + extra:
            assert conflict.headers["content-type"] == "application/problem+json"
            assert conflict.json()["type"] == "urn:idempo:problem:in-progress"
            assert int(conflict.headers["retry-after"]) >= 1
        answered_by = {int(response.headers["x-worker-pid"]) for response in [*responses, *extra]}
        assert answered_by <= served.server.worker_pids()
        assert len(answered_by) >= 2, answered_by

        replay = await client.post(f"/charge/{name}", content=BODY, headers=_headers(key))
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert len(served.rows(name)) == 1
