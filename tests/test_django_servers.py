"""The Django test project served by real servers over TCP: gunicorn with four sync workers (WSGI), and uvicorn
running Django's ASGI handler (``get_asgi_application()``), where Django runs the middleware in a thread of each
request's own. The servers share the test process's ledger (the SQLite file, or the PostgreSQL schema), where the
rows are counted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import django_setup
from tests.support.environment import with_options
from tests.support.gunicorn import run_gunicorn
from tests.support.processes import REPO, free_port, poll, stop_process_group, wait_for_done

django_setup.setup()

from tests.django_project.models import Order  # noqa: E402 - Django is configured first

pytestmark = pytest.mark.slow

CONCURRENT = 40


@pytest.fixture(scope="module")
def pg_ledger(postgres_url: str) -> Iterator[str]:
    """The ``pg`` database's ledger (a schema of the run's own, dropped at the end)."""
    django_setup.create_pg_ledger()
    yield "pg"
    django_setup.drop_pg_ledger()


def environment(store: str, ledger: str) -> dict[str, str]:
    """The test project's settings for a server (``tests/django_project/settings.py``)."""
    return {
        "DJANGO_SETTINGS_MODULE": django_setup.SETTINGS_MODULE,
        "IDEMPO_DJANGO_SQLITE": django_setup.sqlite_path(),
        "IDEMPO_DJANGO_PG_SCHEMA": django_setup.pg_schema(),
        "IDEMPO_DJANGO_LEDGER": ledger,
        "IDEMPO_DJANGO_STORE": store,
    }


def rows(sku: str, ledger: str) -> int:
    count: int = Order.objects.using(ledger).filter(sku=sku).count()
    return count


@contextmanager
def uvicorn(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``uvicorn tests.django_project.asgi:application`` on a free port; its base URL once it serves."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "tests.django_project.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "2"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"uvicorn exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not serve within 30 s:\n{log_path.read_text()}")
            time.sleep(0.05)  # polling another process's readiness; there is no event to wait on
        yield base_url
    finally:
        stop_process_group(process)


async def held_race(base_url: str, directory: Path, sku: str, count: int) -> list[httpx.Response]:
    """*count* identical keyed POSTs at once; the one that claims the key is held in its view (a file gate) until
    every other one was answered, then let go; the responses."""
    hold = directory / f"hold-{sku}"
    hold.touch()
    body: dict[str, Any] = {"sku": sku, "hold": str(hold)}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    limits = httpx.Limits(max_connections=count + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        try:
            tasks = [asyncio.create_task(client.post("/orders", json=body, headers=headers)) for _ in range(count)]
            await poll(lambda: Path(f"{hold}.started").exists(), what="the first request in its view", within=30)
            await wait_for_done(tasks, count - 1, within=60)
        finally:
            hold.unlink(missing_ok=True)
        responses = await asyncio.gather(*tasks)
        responses.append(await client.post("/orders", json=body, headers=headers))  # a retry, once it is over
    return responses


def check_race(responses: list[httpx.Response], count: int) -> None:
    """One request ran (201); every other one sent meanwhile got 409; the retry after it replays it."""
    *racing, retry = responses
    statuses = sorted(response.status_code for response in racing)
    assert statuses == [201] + [409] * (count - 1), statuses
    first = next(response for response in racing if response.status_code == 201)
    assert retry.status_code == 201
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("ledger", ["default", "pg"], ids=["sqlite-ledger", "postgres-ledger"])
def test_gunicorn_four_sync_workers_forty_requests_one_key_one_row(
    ledger: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """40 concurrent keyed POSTs to gunicorn's four sync workers: one row in the ledger (the SQLite file with a
    SQLite store, or PostgreSQL with a PostgreSQL store), 39 conflicts, and the retry replayed."""
    if ledger == "pg":
        request.getfixturevalue("pg_ledger")
        store = with_options(request.getfixturevalue("postgres_url"), table=request.getfixturevalue("table"))
    else:
        store = f"sqlite:///{tmp_path}/idempo.db"
    sku = f"gunicorn-{uuid.uuid4().hex}"
    with run_gunicorn(
        "tests.django_project.wsgi:application", workers=4, worker_class="sync", env=environment(store, ledger)
    ) as server:
        responses = asyncio.run(held_race(server.base_url, tmp_path, sku, CONCURRENT))
        assert len(server.live_worker_pids()) == 4
    check_race(responses, CONCURRENT)
    assert rows(sku, ledger) == 1


def test_django_asgi_handler_under_uvicorn(tmp_path: Path) -> None:
    """Django's ASGI handler runs the sync middleware in a thread of each request's own: a keyed POST held in its
    view does not hold up the others (they get 409 at once), one row is written and the retry replayed; the outcome
    report crosses Django's sync/async adapters (a view's mark_outcome_unknown keeps the key: 503 to the retry); a
    streaming response of an async iterator is recorded and replayed."""
    sku = f"asgi-{uuid.uuid4().hex}"
    env = environment(f"sqlite:///{tmp_path}/idempo.db", "default")
    with uvicorn(env, tmp_path / "uvicorn.log") as base_url:
        responses = asyncio.run(held_race(base_url, tmp_path, sku, 5))
        with httpx.Client(base_url=base_url, timeout=30) as client:
            unknown = {"Idempotency-Key": str(uuid.uuid4())}
            marked = client.post("/mark-unknown", json={"sku": sku + "-unknown"}, headers=unknown)
            retried = client.post("/mark-unknown", json={"sku": sku + "-unknown"}, headers=unknown)
            raised = client.post("/unknown", json={"sku": sku + "-raised"}, headers={"Idempotency-Key": sku})
            stream_key = {"Idempotency-Key": str(uuid.uuid4())}
            streamed = client.post("/astream", json={"sku": sku + "-stream"}, headers=stream_key)
            restreamed = client.post("/astream", json={"sku": sku + "-stream"}, headers=stream_key)
    check_race(responses, 5)
    assert rows(sku, "default") == 1
    assert marked.status_code == 202
    assert retried.status_code == 503
    assert raised.status_code == 503
    assert raised.json()["type"].endswith("outcome-unknown")
    assert rows(sku + "-unknown", "default") == 1
    assert streamed.status_code == 201
    assert streamed.content.count(b"\n") == 5
    assert restreamed.content == streamed.content
    assert restreamed.headers["idempotent-replayed"] == "true"
    assert rows(sku + "-stream", "default") == 1


def test_django_asgi_handler_runs_the_view_in_the_middlewares_transaction(tmp_path: Path) -> None:
    """``"STORE": "django:default"`` under Django's ASGI handler: the sync view, which Django runs through its
    sync/async adapters, still runs in the thread (and on the connection) of the middleware's transaction: its order
    commits with the record (the retry replayed), rolls back when it raises (no row, the key released: the retry
    runs), and rolls back when its key was taken over before the commit."""
    sku = f"asgi-atomic-{uuid.uuid4().hex}"
    env = environment(f"django:default?table=idempo_{uuid.uuid4().hex}", "default")
    with uvicorn(env, tmp_path / "uvicorn.log") as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = client.post("/orders", json={"sku": sku}, headers=key)
        again = client.post("/orders", json={"sku": sku}, headers=key)
        boom = [client.post("/boom", json={"sku": sku + "-boom"}, headers=key | {"Idempotency-Key": sku}) for _ in "ab"]
        taken = client.post("/takeover", json={"sku": sku + "-taken"}, headers={"Idempotency-Key": sku + "-taken"})
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert rows(sku, "default") == 1
    assert [response.status_code for response in boom] == [500, 500]
    assert rows(sku + "-boom", "default") == 0
    assert taken.status_code == 500
    assert rows(sku + "-taken", "default") == 0
