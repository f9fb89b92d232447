"""A charge that is enqueued by an HTTP handler and run by a Celery worker, exactly once per Idempotency-Key.

The pattern (``docs/jobs.md``): the API's ``IdempotencyMiddleware`` runs ``POST /charges`` once per key and
replays its 202 to every retry; the handler enqueues the job with a job id derived from the caller and the key;
the Celery task runs its side effect through a plain function that is ``@idempotent`` on that job id, so a
redelivered message (the same task id, delivered again) returns the stored result instead of charging again.

Run it against a local Redis (database 15 by default; ``--redis-url`` or ``JOBS_REDIS_URL`` to change it)::

    python examples/jobs.py worker           # a Celery worker (solo pool) on the "charges" queue
    python examples/jobs.py serve            # the API under uvicorn on http://127.0.0.1:8001

    KEY=$(python -c 'import uuid; print(uuid.uuid4())')   # a random key, once per operation
curl -i -X POST localhost:8001/charges -H "Idempotency-Key: $KEY" -H 'X-User: alice' \\
         -H 'content-type: application/json' -d '{"order_id": "o-1", "amount": 1000}'
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import MutableMapping
from typing import Any

import redis
from celery import Celery
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from idempo import IdempotencyMiddleware, InProgressError, idempotent
from idempo.stores import Store, SyncStore, store_from_url, sync_store_from_url

REDIS_URL = os.environ.get("JOBS_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "charges"
TASK_NAME = "jobs.charge"

# Job ids are UUIDv5 names in this namespace (a fixed, random UUID of this example's own).
JOB_ID_NAMESPACE = uuid.UUID("5d0a8d56-27a4-4f4e-9d0e-6f3c2b1a9e47")


# --- who is asking ----------------------------------------------------------------------------------------------


def user_id(scope: MutableMapping[str, Any]) -> str:
    """The caller: a stand-in for your authentication, which would put the user in the scope. Here it is the
    ``X-User`` header (``""`` when absent). The middleware's records are namespaced by it (its ``principal``), and
    the job id is derived from it, so two users who happen to send the same key never share a charge."""
    for name, value in scope["headers"]:
        if name == b"x-user":
            return bytes(value).decode("latin-1")
    return ""


def job_id_for(user: str, key: str) -> str:
    """The job id of *user*'s request with Idempotency-Key *key*: a UUIDv5 of the pair.

    Keys are only unique per caller, so the key alone would let one user's job shadow another's. ``[user, key]``
    is encoded as JSON, which cannot be ambiguous (unlike ``f"{user}:{key}"`` with a colon in either part); the
    UUID keeps the id short, free of the user's identity, and in the shape Celery's own ids have. The same user
    and key always give the same id: that is what lets the worker recognise a redelivery.
    """
    return str(uuid.uuid5(JOB_ID_NAMESPACE, json.dumps([user, key])))


# --- the side effect --------------------------------------------------------------------------------------------


class Payments:
    """The side effect: a stand-in for a payment provider that appends each charge to a Redis list per order
    (``<prefix>ledger:<order_id>``), so that charging twice is visible as two entries."""

    def __init__(self, client: redis.Redis, *, prefix: str = "jobs:") -> None:
        self.client = client
        self.prefix = prefix

    def ledger_key(self, order_id: str) -> str:
        return f"{self.prefix}ledger:{order_id}"

    def charge(self, order_id: str, amount: int) -> str:
        receipt = f"rcpt_{uuid.uuid4().hex[:16]}"
        self.client.rpush(self.ledger_key(order_id), json.dumps({"receipt": receipt, "amount": amount}))
        return receipt

    def charges(self, order_id: str) -> list[dict[str, Any]]:
        entries = self.client.lrange(self.ledger_key(order_id), 0, -1)
        return [json.loads(entry) for entry in entries]


# --- the worker -------------------------------------------------------------------------------------------------


def create_celery(redis_url: str, *, store: SyncStore, payments: Payments, queue: str = QUEUE) -> Celery:
    """The Celery app: broker and result backend on *redis_url*, and the task ``jobs.charge(order_id, amount)``.

    The task's side effect runs inside ``charge_once``, which is ``@idempotent`` on the task id (the job id the
    API chose): the first delivery of a job charges and stores its result in *store*; any later delivery of the
    same task id (a broker redelivery, a retry, a duplicate enqueue) returns that stored result without charging.
    """
    celery = Celery("jobs", broker=redis_url, backend=redis_url, set_as_current=False)
    celery.conf.update(
        task_default_queue=queue,
        # Acknowledge a message after the task ran, not before: a worker that dies mid-job gets the job
        # redelivered, and the idempotent body makes the redelivery safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )

    # lease: how long a running job holds its id without renewal (renewed every 20 s while it runs). If the worker
    # dies, a redelivery after the lease charges again: the provider call itself should then be keyed too.
    @idempotent(store, key="{job_id}", namespace="jobs.charge", lease=60)
    def charge_once(job_id: str, order_id: str, amount: int) -> dict[str, Any]:
        receipt = payments.charge(order_id, amount)
        return {"job_id": job_id, "order_id": order_id, "amount": amount, "receipt": receipt}

    def charge(task: Any, order_id: str, amount: int) -> dict[str, Any]:
        try:
            return charge_once(task.request.id, order_id, amount)
        except InProgressError as exc:
            # The same job is running right now (a redelivery overtook it): come back when its lease may be over.
            # The retry keeps the task id, so it then returns the first run's stored result.
            raise task.retry(exc=exc, countdown=exc.retry_after) from exc

    # Celery has no type hints: registered with a call rather than an (untyped) decorator.
    celery.task(bind=True, name=TASK_NAME, max_retries=5)(charge)
    return celery


# --- the API ----------------------------------------------------------------------------------------------------


class ChargeIn(BaseModel):
    order_id: str
    amount: int


class JobAccepted(BaseModel):
    job_id: str
    status: str = "queued"


def create_api(celery: Celery, *, store: Store | str) -> FastAPI:
    """The API: ``POST /charges`` (an Idempotency-Key and an ``X-User`` required) enqueues ``jobs.charge`` with
    the job id of :func:`job_id_for` and answers 202 with it. The middleware runs the handler once per user and
    key and replays the 202 to every retry, so a retried request enqueues nothing."""
    api = FastAPI(title="idempo jobs example")
    charge_task = celery.tasks[TASK_NAME]

    # A plain `def`: FastAPI runs it in a thread, where Celery's blocking publish belongs.
    @api.post("/charges", status_code=202)
    def create_charge(charge: ChargeIn, request: Request) -> JobAccepted:
        user = user_id(request.scope)
        if not user:
            raise HTTPException(status_code=401, detail="X-User is required")
        job_id = job_id_for(user, request.state.idempotency_key)
        charge_task.apply_async(args=(charge.order_id, charge.amount), task_id=job_id)
        return JobAccepted(job_id=job_id)

    api.add_middleware(IdempotencyMiddleware, store=store, require_key=True, principal=user_id)
    return api


# --- running it -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["worker", "serve"])
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)

    store = sync_store_from_url(args.redis_url, prefix="jobs:idem:")
    payments = Payments(redis.Redis.from_url(args.redis_url))
    celery = create_celery(args.redis_url, store=store, payments=payments)
    if args.command == "worker":
        celery.worker_main(["worker", "--pool=solo", "--loglevel=INFO", f"--queues={QUEUE}"])
    else:
        import uvicorn

        api = create_api(celery, store=store_from_url(args.redis_url, prefix="jobs:http:"))
        uvicorn.run(api, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
