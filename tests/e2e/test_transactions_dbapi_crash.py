"""idempo.transactions across a real crash, on the DB-API drivers: gunicorn workers (sync psycopg on PostgreSQL,
sqlite3 on a SQLite file) and a uvicorn process (async psycopg) serving ``tests.e2e.tx_dbapi_app``, whose handler
SIGKILLs its own process on request (``X-Fault``), counted in a ledger table of the application's database.

- bound (the handler calls ``record()`` in its transaction), killed after the commit: the retry is replayed at
  once, the killed worker's own response; one ledger row;
- plain (no ``record()``), killed after the commit: the key stays in progress until its lease runs out, then the
  retry runs the charge a second time (two rows): the gap ``record()`` closes;
- bound, killed inside the transaction: nothing happened (no row); the retry is a 409 until the lease runs out,
  then runs once;
- forty requests at once under one key, across four workers (bound, PostgreSQL), the first held inside its
  transaction after its record: thirty-nine 409s, one row.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from idempo import Record, State
from idempo.stores import SyncStore, sync_store_from_url
from tests.support.environment import with_options
from tests.support.gunicorn import Gunicorn, run_gunicorn
from tests.support.processes import (
    REPO,
    alive,
    free_port,
    lines,
    poll,
    stop_process_group,
    store_key,
    wait_for_done,
)
from tests.support.stores import drop_table, new_table

pytestmark = pytest.mark.slow

APP = "tests.e2e.tx_dbapi_app:create_app()"
ASGI_APP = "tests.e2e.tx_dbapi_app:create_asgi_app"
LEASE = 2.0  # short, so that a key a killed worker held is free again soon
CONCURRENCY = 40
BODY = b'{"amount": 1999, "currency": "eur"}'
STARTUP_DEADLINE = 30.0


@dataclass(frozen=True)
class Database:
    """The application's database (the ledger and the store's table in it), as the test reads it."""

    kind: str  # "postgres" or "sqlite"
    location: str  # a PostgreSQL URL, or a SQLite file's path
    table: str
    ledger: str

    def rows(self, name: str) -> list[tuple[int, int]]:
        """``(id, pid)`` of the ledger rows of the charge *name*, in order."""
        if self.kind == "postgres":
            query = sql.SQL("SELECT id, pid FROM {} WHERE name = %s ORDER BY id").format(sql.Identifier(self.ledger))
            with psycopg.connect(self.location) as pg:
                return [(int(row[0]), int(row[1])) for row in pg.execute(query, (name,)).fetchall()]
        conn = sqlite3.connect(self.location, timeout=30)
        try:
            found = conn.execute(f'SELECT id, pid FROM "{self.ledger}" WHERE name = ? ORDER BY id', (name,)).fetchall()
        finally:
            conn.close()
        return [(int(row_id), int(pid)) for row_id, pid in found]

    def store(self) -> SyncStore:
        """The application's store, opened by the test to read its records."""
        if self.kind == "postgres":
            return sync_store_from_url(with_options(self.location, table=self.table))
        return sync_store_from_url(f"sqlite:///{self.location}?table={self.table}")

    def env(self, mode: str, lease: float = LEASE) -> dict[str, str]:
        return {
            "TX_E2E_DATABASE": self.location,
            "TX_E2E_TABLE": self.table,
            "TX_E2E_LEDGER": self.ledger,
            "TX_E2E_MODE": mode,
            "TX_E2E_LEASE": str(lease),
        }


@pytest.fixture(scope="module")
def postgres_database(postgres_url: str) -> Iterator[Database]:
    table, ledger = new_table(), f"ledger_{uuid.uuid4().hex[:16]}"
    create = "CREATE TABLE {} (id serial PRIMARY KEY, name text NOT NULL, idem_key text, pid integer NOT NULL)"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL(create).format(sql.Identifier(ledger)))
    try:
        yield Database("postgres", postgres_url, table, ledger)
    finally:
        drop_table(postgres_url, ledger)
        drop_table(postgres_url, table)


@pytest.fixture(scope="module")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> Database:
    path = tmp_path_factory.mktemp("tx-sqlite") / "app.db"
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, name TEXT NOT NULL, idem_key TEXT, pid INTEGER)")
    finally:
        conn.close()
    return Database("sqlite", str(path), "idempo_records", "ledger")


class Servers:
    """The gunicorns of the module, started when a test first needs one (a database and a mode), stopped at its
    end."""

    def __init__(self, request: pytest.FixtureRequest, stack: ExitStack, side_dir: Path) -> None:
        self.request = request
        self.stack = stack
        self.side_dir = side_dir  # the gates' files
        self.running: dict[tuple[str, str, float], Gunicorn] = {}

    def database(self, kind: str) -> Database:
        database: Database = self.request.getfixturevalue(f"{kind}_database")
        return database

    def get(self, kind: str, mode: str, *, lease: float = LEASE) -> Gunicorn:
        if (kind, mode, lease) not in self.running:
            workers = 4 if (kind, mode) == ("postgres", "bound") else 2
            env = {**self.database(kind).env(mode, lease), "TX_E2E_DIR": str(self.side_dir)}
            server = run_gunicorn(APP, workers=workers, env=env)
            self.running[kind, mode, lease] = self.stack.enter_context(server)
        return self.running[kind, mode, lease]


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with ExitStack() as stack:
        yield Servers(request, stack, tmp_path_factory.mktemp("tx-side"))


def _headers(key: str, fault: str = "") -> dict[str, str]:
    return {"Idempotency-Key": key, "Content-Type": "application/json", **({"X-Fault": fault} if fault else {})}


async def _killed(client: httpx.AsyncClient, path: str, key: str, fault: str) -> None:
    """POST with a fault: the worker kills itself, and the client gets no response."""
    with pytest.raises(httpx.TransportError):
        await client.post(path, content=BODY, headers=_headers(key, fault))


async def _dead(pid: int) -> None:
    await poll(lambda: not alive(pid), what=f"worker {pid} to be dead")


def _in_progress(store: SyncStore, key: str) -> Record:
    found = store.get(store_key(key))
    assert found is not None
    assert found.state is State.IN_PROGRESS, found.state
    return found


async def _after_the_lease(client: httpx.AsyncClient, path: str, key: str) -> httpx.Response:
    """Retry, as a client honouring Retry-After would (faster), until the key is not in progress any more."""
    deadline = time.monotonic() + LEASE + 15.0
    while (retry := await client.post(path, content=BODY, headers=_headers(key))).status_code == 409:
        assert retry.json()["type"] == "urn:idempo:problem:in-progress"
        assert time.monotonic() < deadline, "the key stayed in progress 15 s after its lease should have run out"
        await asyncio.sleep(0.1)
    return retry


# -- a crash after the commit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
async def test_bound_a_crash_after_the_commit_is_replayed_and_runs_once(servers: Servers, kind: str) -> None:
    server, database = servers.get(kind, "bound"), servers.database(kind)
    name, key = f"after-{uuid.uuid4().hex}", str(uuid.uuid4())
    path = f"/charge/{name}"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
        await _killed(client, path, key, "after-commit")
        ((row_id, victim),) = database.rows(name)  # committed, with the completed record
        assert victim in server.worker_pids()
        await _dead(victim)

        retry = await client.post(path, content=BODY, headers=_headers(key))  # at once: no lease to wait for
        assert retry.status_code == 201, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.json() == {"id": row_id, "name": name, "pid": victim, "key": key}  # the killed worker's
        assert database.rows(name) == [(row_id, victim)]


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
async def test_plain_a_crash_after_the_commit_runs_again_once_the_lease_is_over(servers: Servers, kind: str) -> None:
    """Without record(): what the response-in-the-transaction is for (today's behaviour of every middleware)."""
    server, database = servers.get(kind, "plain"), servers.database(kind)
    name, key = f"plain-{uuid.uuid4().hex}", str(uuid.uuid4())
    path = f"/charge/{name}"
    store = database.store()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
            await _killed(client, path, key, "after-commit")
            ((_, victim),) = database.rows(name)  # the charge committed; its response never reached the store
            await _dead(victim)
            held = _in_progress(store, key)

            immediate = await client.post(path, content=BODY, headers=_headers(key))
            assert time.time() < held.lease_expires_at, "the retry came too late to see the lease; raise LEASE"
            assert immediate.status_code == 409, immediate.text

            retry = await _after_the_lease(client, path, key)
            assert retry.status_code == 201, retry.text
            assert "idempotent-replayed" not in retry.headers
            assert retry.json()["pid"] != victim
    finally:
        store.close()
    rows = database.rows(name)
    assert len(rows) == 2, rows  # charged twice
    assert rows[0][1] == victim


# -- a crash inside the transaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
async def test_bound_a_crash_before_the_commit_leaves_nothing_and_the_retry_runs_once(
    servers: Servers, kind: str
) -> None:
    server, database = servers.get(kind, "bound"), servers.database(kind)
    name, key = f"before-{uuid.uuid4().hex}", str(uuid.uuid4())
    path = f"/charge/{name}"
    store = database.store()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
            before = server.live_worker_pids()
            await _killed(client, path, key, "before-commit")
            assert database.rows(name) == []  # the insert and the record rolled back with the process
            held = _in_progress(store, key)  # the claim, as it was before the handler's transaction

            immediate = await client.post(path, content=BODY, headers=_headers(key))
            assert time.time() < held.lease_expires_at, "the retry came too late to see the lease; raise LEASE"
            assert immediate.status_code == 409, immediate.text
            assert database.rows(name) == []

            retry = await _after_the_lease(client, path, key)
            assert retry.status_code == 201, retry.text
            assert "idempotent-replayed" not in retry.headers
            ((row_id, runner),) = database.rows(name)
            assert retry.json() == {"id": row_id, "name": name, "pid": runner, "key": key}
            victims = [pid for pid in before if not alive(pid)]
            assert len(victims) == 1, victims
            assert runner != victims[0]

            replay = await client.post(path, content=BODY, headers=_headers(key))
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.content == retry.content
    finally:
        store.close()
    assert len(database.rows(name)) == 1


# -- forty at once ----------------------------------------------------------------------------------------------------


async def test_forty_requests_at_once_under_one_key_charge_once(servers: Servers) -> None:
    """The first request is held inside its transaction, after its record (the row of the key locked by its
    uncommitted completion): the others, across the workers, find the key in progress (409) at once, none waits
    on the lock; once it commits, a retry is replayed.

    With a lease longer than the test: a transaction held open past its lease (which is not renewed once the response
    is recorded) is one a retry may try to take over, and that claim waits for the row lock (up to the store's
    statement_timeout, then a 503): the docs say to keep transactions shorter than the lease. On a slow machine the
    forty requests took longer than LEASE."""
    server, database = servers.get("postgres", "bound", lease=30.0), servers.database("postgres")
    name, key = f"forty-{uuid.uuid4().hex}", str(uuid.uuid4())
    path = f"/charge/{name}"
    hold = servers.side_dir / f"{name}.hold"
    hold.touch()
    headers = {**_headers(key), "X-Hold": name}
    limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY + 10)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0, limits=limits) as client:
        tasks = [asyncio.create_task(client.post(path, content=BODY, headers=headers)) for _ in range(CONCURRENCY)]
        try:
            await wait_for_done(tasks, CONCURRENCY - 1, within=30.0)
            assert len(lines(servers.side_dir / f"{name}.started")) == 1
            assert database.rows(name) == []  # the one execution is held, uncommitted
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        ((row_id, runner),) = database.rows(name)
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [201] + [409] * (CONCURRENCY - 1), statuses
        (original,) = [response for response in responses if response.status_code == 201]
        assert "idempotent-replayed" not in original.headers
        assert original.json() == {"id": row_id, "name": name, "pid": runner, "key": key}
        answered_by = {int(response.headers["x-worker-pid"]) for response in responses}
        assert len(answered_by) >= 2, answered_by  # the runner's worker was busy: other processes said 409
        assert answered_by <= server.worker_pids()

        replay = await client.post(path, content=BODY, headers=_headers(key))
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == original.content
    assert len(database.rows(name)) == 1


# -- async psycopg under uvicorn -------------------------------------------------------------------------------------


@contextmanager
def run_uvicorn(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One ``uvicorn --factory`` process serving the ASGI app on a free port; stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", ASGI_APP, "--factory", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "--no-access-log", "--timeout-graceful-shutdown", "2"],
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        with httpx.Client(base_url=base_url, timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"uvicorn exited with {process.returncode}:\n{log_path.read_text()}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"uvicorn did not serve in time:\n{log_path.read_text()}"
                time.sleep(0.05)  # polling another process's readiness; there is no event to wait on
        yield base_url, process
    finally:
        stop_process_group(process)


async def test_async_psycopg_under_uvicorn_a_crash_after_the_commit_is_replayed(
    postgres_database: Database, tmp_path: Path
) -> None:
    database = postgres_database
    name, key = f"uvicorn-{uuid.uuid4().hex}", str(uuid.uuid4())
    path = f"/charge/{name}"
    log = tmp_path / "uvicorn.log"
    with run_uvicorn(database.env("bound"), log) as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
            await _killed(client, path, key, "after-commit")
        assert process.wait(timeout=10) == -9  # SIGKILL: the whole server is gone
    ((row_id, victim),) = database.rows(name)
    assert victim == process.pid

    with run_uvicorn(database.env("bound"), log) as (base_url, _):  # the server restarted
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
            retry = await client.post(path, content=BODY, headers=_headers(key))
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == {"id": row_id, "name": name, "pid": victim, "key": key}
    assert database.rows(name) == [(row_id, victim)]
