"""Exactly once across a crash, with no code in the view: the Django test project under gunicorn's sync workers, its
store on the Django database the views write to (``"STORE": "django:<alias>"``, ``"ATOMIC"`` on by default), on the
SQLite file and on PostgreSQL, with a short lease (2 s).

The views' fault hook (``tests/django_project/views.py``) SIGKILLs the worker: ``X-Fault: after-commit`` right after
the transaction holding the order commits, ``X-Fault: before-commit`` inside it, right after the insert. Rows are
counted in the ledger, from the test process.

- after the commit: the order and the completed key committed together, so the retry is replayed at once (one row);
  with ``"ATOMIC": False`` (today's behaviour) the key stays in progress until the lease runs out, and the retry
  then runs the view again (two rows);
- before the commit: nothing happened (no row); the retry gets 409 while the dead worker's lease lasts, then runs
  the view once;
- forty concurrent requests under one key across four workers: one row, 39 conflicts, the retry replayed.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import django_setup
from tests.support.gunicorn import Gunicorn, run_gunicorn
from tests.support.processes import poll, wait_for_done
from tests.support.stores import new_table

django_setup.setup()

from tests.django_project.models import Order  # noqa: E402 - Django is configured first

pytestmark = pytest.mark.slow

APP = "tests.django_project.wsgi:application"
LEASE = 2.0
CONCURRENT = 40
AFTER_LEASE = 20.0  # the most seconds a retry may wait for a dead worker's lease to run out (it takes LEASE)


@pytest.fixture(scope="module", params=["default", "pg"], ids=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest) -> Iterator[str]:
    """The database the views write orders to, where the store keeps its records: the SQLite file, or the run's
    own PostgreSQL schema (made here, dropped at the end)."""
    if request.param == "default":
        yield "default"
        return
    request.getfixturevalue("postgres_url")
    django_setup.create_pg_ledger()
    yield "pg"
    django_setup.drop_pg_ledger()


@dataclass(frozen=True)
class Served:
    """The project under gunicorn, on *ledger*."""

    gunicorn: Gunicorn
    ledger: str
    workers: int

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.gunicorn.base_url, timeout=30)

    def rows(self, sku: str) -> int:
        count: int = Order.objects.using(self.ledger).filter(sku=sku).count()
        return count


def serve(ledger: str, *, atomic: bool | None, workers: int) -> Any:
    """gunicorn serving the project with its store on *ledger* (a table of its own) and a 2 s lease; ``atomic``:
    ``IDEMPO["ATOMIC"]``, or its default (``None``)."""
    env = {
        "DJANGO_SETTINGS_MODULE": django_setup.SETTINGS_MODULE,
        "IDEMPO_DJANGO_SQLITE": django_setup.sqlite_path(),
        "IDEMPO_DJANGO_PG_SCHEMA": django_setup.pg_schema(),
        "IDEMPO_DJANGO_LEDGER": ledger,
        "IDEMPO_DJANGO_STORE": f"django:{ledger}?table={new_table()}",
        "IDEMPO_DJANGO_LEASE": str(LEASE),
    }
    if atomic is not None:
        env["IDEMPO_DJANGO_ATOMIC"] = "1" if atomic else "0"
    return run_gunicorn(APP, workers=workers, worker_class="sync", env=env)


@pytest.fixture(scope="module")
def atomic(ledger: str) -> Iterator[Served]:
    """Four sync workers, ``"ATOMIC"`` by default (on, the store being the Django database)."""
    with serve(ledger, atomic=None, workers=4) as gunicorn:
        yield Served(gunicorn, ledger, 4)


@pytest.fixture(scope="module")
def plain(ledger: str) -> Iterator[Served]:
    """Two sync workers, ``"ATOMIC": False``: today's behaviour, with the same store."""
    with serve(ledger, atomic=False, workers=2) as gunicorn:
        yield Served(gunicorn, ledger, 2)


def order(sku: str) -> dict[str, Any]:
    return {"sku": sku}


def crash(served: Served, client: httpx.Client, key: str, sku: str, fault: str) -> None:
    """A keyed POST /orders whose worker is SIGKILLed at *fault*: no answer (the connection drops); then gunicorn's
    replacement of the worker, awaited."""
    served.gunicorn.wait_for_workers(served.workers)
    with pytest.raises(httpx.TransportError):
        client.post("/orders", json=order(sku), headers={"Idempotency-Key": key, "X-Fault": fault})
    served.gunicorn.wait_for_workers(served.workers)


def retry_until_run(client: httpx.Client, key: str, sku: str) -> tuple[list[int], httpx.Response]:
    """Retry the POST until it is not a 409 (the dead worker's lease ran out), within :data:`AFTER_LEASE` seconds:
    the statuses seen before, and the answer."""
    seen: list[int] = []
    deadline = time.monotonic() + AFTER_LEASE
    while True:
        response = client.post("/orders", json=order(sku), headers={"Idempotency-Key": key})
        if response.status_code != 409:
            return seen, response
        seen.append(response.status_code)
        if time.monotonic() > deadline:
            raise AssertionError(f"still 409 after {AFTER_LEASE} s")
        time.sleep(0.1)  # polling another process's lease, which runs out on the store's clock


def test_a_crash_after_the_commit_leaves_the_retry_a_replay(atomic: Served) -> None:
    """The worker dies right after the transaction holding the order and the completed key commits: the retry is
    replayed at once, and the ledger has one row."""
    sku = f"after-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    with atomic.client() as client:
        crash(atomic, client, key, sku, "after-commit")
        assert atomic.rows(sku) == 1
        retry = client.post("/orders", json=order(sku), headers={"Idempotency-Key": key})
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["sku"] == sku
    assert atomic.rows(sku) == 1


def test_without_atomic_a_crash_after_the_commit_runs_the_view_twice(plain: Served) -> None:
    """Today's behaviour, which ATOMIC fixes: the order committed on its own, the worker died before the key was
    completed; the retry waits out the lease (409), then runs the view again: two rows."""
    sku = f"plain-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    with plain.client() as client:
        crash(plain, client, key, sku, "after-commit")
        assert plain.rows(sku) == 1
        seen, retry = retry_until_run(client, key, sku)
    assert set(seen) <= {409}
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers
    assert plain.rows(sku) == 2


def test_a_crash_before_the_commit_leaves_nothing_and_the_retry_runs_once(atomic: Served) -> None:
    """The worker dies inside the transaction, after the insert: no row. The key stays in progress until the dead
    worker's lease runs out (409s), then the retry runs the view once; the next retry is replayed."""
    sku = f"before-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    with atomic.client() as client:
        crash(atomic, client, key, sku, "before-commit")
        assert atomic.rows(sku) == 0
        seen, retry = retry_until_run(client, key, sku)
        again = client.post("/orders", json=order(sku), headers={"Idempotency-Key": key})
    assert set(seen) <= {409}
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == retry.content
    assert atomic.rows(sku) == 1


async def held_race(base_url: str, hold: str, sku: str) -> list[httpx.Response]:
    """:data:`CONCURRENT` identical keyed POSTs at once; the one that claims the key is held in its view, inside its
    transaction, before it writes (the file gate *hold*, which exists), until every other one was answered; then a
    retry."""
    body = {"sku": sku, "hold_before": hold}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    limits = httpx.Limits(max_connections=CONCURRENT + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        try:
            tasks = [asyncio.create_task(client.post("/orders", json=body, headers=headers)) for _ in range(CONCURRENT)]
            await poll(lambda: Path(f"{hold}.started").exists(), what="the first request in its view", within=30)
            await wait_for_done(tasks, CONCURRENT - 1, within=60)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(hold)  # the gate opens
        responses = await asyncio.gather(*tasks)
        responses.append(await client.post("/orders", json=body, headers=headers))
    return responses


def test_forty_concurrent_requests_under_one_key_across_four_workers_write_one_row(
    atomic: Served, tmp_path: Path
) -> None:
    """The request that claims the key waits inside its transaction while 39 others, spread over the four sync
    workers, are answered 409; then it writes and commits with its record: one row, and the retry replayed."""
    sku = f"race-{uuid.uuid4().hex}"
    atomic.gunicorn.wait_for_workers(4)
    hold = tmp_path / "hold"
    hold.touch()
    try:
        *racing, retry = asyncio.run(held_race(atomic.gunicorn.base_url, str(hold), sku))
    finally:
        hold.unlink(missing_ok=True)
    assert sorted(response.status_code for response in racing) == [201] + [409] * (CONCURRENT - 1)
    first = next(response for response in racing if response.status_code == 201)
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert atomic.rows(sku) == 1
    assert len(atomic.gunicorn.live_worker_pids()) == 4
