"""The Flask extension under a real gunicorn: 4 gthread workers of 2 threads each, one store and one business
database shared by all, 40 concurrent requests under one key over real TCP: the order runs exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from idempo.stores import sync_store_from_url

from .flask_app import Business
from .support.gunicorn import run_gunicorn

CONCURRENT = 40


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_forty_concurrent_requests_under_one_key_run_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every answer is the one execution's 201 (run or replayed) or a 409 while it runs; one row is written."""
    if backend == "sqlite":
        store_url = f"sqlite:///{tmp_path / 'idempo.db'}"
        business = Business(f"sqlite:///{tmp_path / 'business.db'}")
    else:
        postgres_url: str = request.getfixturevalue("postgres_url")
        table: str = request.getfixturevalue("table")
        store_url = f"{postgres_url}?table={table}"
        business = Business(postgres_url, f"{table}_orders")
    business.create()  # before the workers start: they would race to create it
    store = sync_store_from_url(store_url)
    store.get("warm-up")  # the store's table, made once
    store.close()
    env = {
        "BUSINESS_DB": business.url,
        "BUSINESS_TABLE": business.table,
        "IDEMPO_STORE": store_url,
        "ORDER_DELAY": "0.3",  # the order's work: long enough for the requests to overlap
    }
    key = str(uuid.uuid4())
    try:
        with run_gunicorn(
            "tests.flask_app:create_app()", workers=4, worker_class="gthread", threads=2, env=env
        ) as server:
            limits = httpx.Limits(max_connections=CONCURRENT)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
                responses = await asyncio.gather(
                    *(
                        client.post("/orders/once", json={"sku": "x"}, headers={"Idempotency-Key": key})
                        for _ in range(CONCURRENT)
                    )
                )
            log = server.log()
        statuses = sorted({response.status_code for response in responses})
        assert set(statuses) <= {201, 409}, log
        executed = {response.content for response in responses if response.status_code == 201}
        assert len(executed) == 1, executed
        assert json.loads(executed.pop())["key"] == key
        assert business.count("once") == 1
    finally:
        business.drop()
