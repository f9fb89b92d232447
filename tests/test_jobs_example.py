"""examples/jobs.py end to end: the API, a real Celery worker (in-process) and the real Redis.

The worker runs in a thread of this process (``celery.contrib.testing.worker.start_worker``, solo pool) on a queue
of its own, in Redis database 15 of the server ``redis_url`` names; every key the test makes is unique to this
run and deleted afterwards (never a FLUSH: the server is shared).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker

from idempo.stores import store_from_url, sync_store_from_url

if TYPE_CHECKING:
    import jobs  # examples/jobs.py (mypy checks examples/ as top-level modules)
else:
    _spec = importlib.util.spec_from_file_location("jobs", Path(__file__).parent.parent / "examples" / "jobs.py")
    assert _spec is not None
    assert _spec.loader is not None
    jobs = importlib.util.module_from_spec(_spec)
    sys.modules["jobs"] = jobs
    _spec.loader.exec_module(jobs)

pytestmark = [
    pytest.mark.slow,  # starts a Celery worker
    # Celery's Redis result backend stores results with SETEX, which redis-py 8 marks deprecated.
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

RESULT_TIMEOUT = 15


def _database_15(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/15", parts.query, parts.fragment))


@dataclass
class Published:
    """Messages for ``jobs.charge`` that left a producer, by task id."""

    ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        if sender == jobs.TASK_NAME and headers is not None:
            with self.lock:
                self.ids.append(str(headers["id"]))

    def count(self, task_id: str) -> int:
        with self.lock:
            return self.ids.count(task_id)


@dataclass
class Ran:
    """Runs of the task body that returned, as (task id, return value)."""

    runs: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, sender: Any = None, task_id: str = "", retval: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == jobs.TASK_NAME:
            with self.lock:
                self.runs.append((task_id, retval))

    def of(self, task_id: str) -> list[Any]:
        with self.lock:
            return [retval for tid, retval in self.runs if tid == task_id]


@dataclass
class Env:
    url: str
    celery: Celery
    payments: jobs.Payments
    published: Published
    ran: Ran
    prefix: str


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    url = _database_15(redis_url)
    run = uuid.uuid4().hex[:12]
    prefix = f"idempo-test-jobs:{run}:"
    queue = f"idempo-test-jobs-{run}"
    client: redis.Redis = redis.Redis.from_url(url)
    store = sync_store_from_url(url, prefix=prefix + "idem:")
    payments = jobs.Payments(client, prefix=prefix)
    celery = jobs.create_celery(url, store=store, payments=payments, queue=queue)
    celery.conf.worker_enable_remote_control = False  # no pidbox queue left behind in the shared Redis
    published, ran = Published(), Ran()
    signals.after_task_publish.connect(published, weak=False)
    signals.task_postrun.connect(ran, weak=False)
    try:
        with start_worker(celery, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=15):
            yield Env(url, celery, payments, published, ran, prefix)
    finally:
        signals.after_task_publish.disconnect(published)
        signals.task_postrun.disconnect(ran)
        celery.close()
        store.close()
        # What this run left in database 15: its own prefix, its queue's binding, and the task results.
        task_ids = {tid for tid, _ in ran.runs} | set(published.ids)
        leftovers = list(client.scan_iter(match=f"{prefix}*"))
        leftovers += [
            f"_kombu.binding.{queue}",
            f"_kombu.binding_permanent.{queue}",
            queue,
            *(f"celery-task-meta-{tid}" for tid in task_ids),
        ]
        client.delete(*leftovers)
        client.close()


@pytest.fixture
async def api(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    store = store_from_url(env.url, prefix=env.prefix + "http:")
    app = jobs.create_api(env.celery, store=store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://jobs") as client:
            yield client
    finally:
        await store.close()


def _headers(key: str, user: str = "alice") -> dict[str, str]:
    return {"Idempotency-Key": key, "X-User": user}


async def _result(env: Env, job_id: str) -> Any:
    result = env.celery.AsyncResult(job_id)
    return await asyncio.to_thread(result.get, timeout=RESULT_TIMEOUT)


def _order() -> str:
    return f"o-{uuid.uuid4().hex[:12]}"


async def test_a_retried_request_enqueues_once_and_charges_once(env: Env, api: httpx.AsyncClient) -> None:
    order, key = _order(), str(uuid.uuid4())
    body = {"order_id": order, "amount": 1000}

    first = await api.post("/charges", json=body, headers=_headers(key))
    retry = await api.post("/charges", json=body, headers=_headers(key))

    assert first.status_code == 202
    job_id = first.json()["job_id"]
    assert job_id == jobs.job_id_for("alice", key)
    assert (retry.status_code, retry.json()) == (202, first.json())
    assert retry.headers["idempotent-replayed"] == "true"
    assert env.published.count(job_id) == 1  # the replay enqueued nothing

    receipt = await _result(env, job_id)
    assert receipt["order_id"] == order
    assert receipt["job_id"] == job_id
    assert env.payments.charges(order) == [{"receipt": receipt["receipt"], "amount": 1000}]


async def test_a_redelivered_job_returns_the_stored_result_without_charging(env: Env, api: httpx.AsyncClient) -> None:
    order, key = _order(), str(uuid.uuid4())
    response = await api.post("/charges", json={"order_id": order, "amount": 250}, headers=_headers(key))
    job_id = response.json()["job_id"]
    first = await _result(env, job_id)

    # The broker delivers the same task id again (e.g. the worker lost its connection before acking). Forget the
    # first result so that waiting for the second run really waits for it.
    env.celery.AsyncResult(job_id).forget()
    env.celery.tasks[jobs.TASK_NAME].apply_async(args=(order, 250), task_id=job_id)
    second = await _result(env, job_id)

    assert second == first
    assert env.ran.of(job_id) == [first, first]  # the task ran twice ...
    assert env.payments.charges(order) == [{"receipt": first["receipt"], "amount": 250}]  # ... and charged once


async def test_different_orders_are_separate_charges(env: Env, api: httpx.AsyncClient) -> None:
    orders = [_order(), _order()]
    job_ids = []
    for order in orders:
        body = {"order_id": order, "amount": 500}
        response = await api.post("/charges", json=body, headers=_headers(str(uuid.uuid4())))
        assert response.status_code == 202
        job_ids.append(response.json()["job_id"])

    receipts = [await _result(env, job_id) for job_id in job_ids]

    assert len(set(job_ids)) == 2
    assert receipts[0]["receipt"] != receipts[1]["receipt"]
    for order, receipt in zip(orders, receipts, strict=True):
        assert env.payments.charges(order) == [{"receipt": receipt["receipt"], "amount": 500}]


async def test_two_users_with_the_same_key_get_separate_jobs(env: Env, api: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    orders = {"alice": _order(), "bob": _order()}
    job_ids = {}
    for user, order in orders.items():
        response = await api.post("/charges", json={"order_id": order, "amount": 700}, headers=_headers(key, user))
        assert response.status_code == 202
        assert "idempotent-replayed" not in response.headers
        job_ids[user] = response.json()["job_id"]

    assert job_ids["alice"] != job_ids["bob"]
    for user, order in orders.items():
        receipt = await _result(env, job_ids[user])
        assert env.payments.charges(order) == [{"receipt": receipt["receipt"], "amount": 700}]


async def test_requests_without_a_key_or_a_user_are_refused(env: Env, api: httpx.AsyncClient) -> None:
    order = _order()
    body = {"order_id": order, "amount": 1}

    no_key = await api.post("/charges", json=body, headers={"X-User": "alice"})
    no_user = await api.post("/charges", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})

    assert no_key.status_code == 400
    assert no_user.status_code == 401
    assert env.payments.charges(order) == []
