"""The lease of a request whose response the app recorded in its own transaction is no longer renewed: on PostgreSQL
the renewal would wait for that transaction's row lock (renewals piling up behind it, each holding a connection of
the store's pool), and until the transaction ends no other request can take the key over anyway.

Real time passes here on purpose: the renewer is driven by the clock (a sweep every ``lease / 3``), and what is tested
is that none of its sweeps renews the recorded request while its transaction stays open for several leases.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Column, Integer, MetaData, Table, insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from idempo import IdempotencyMiddleware, Store
from idempo.observe import Outcome, StoreOperation
from idempo.transactions import record_async, store_for
from tests.support.stores import drop_table, new_table

LEASE = 0.3  # a sweep every 0.1 s


class Calls:
    def __init__(self) -> None:
        self.store_calls: list[str] = []

    def on_request(self, outcome: Outcome, scope: Any) -> None:
        pass

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        self.store_calls.append(operation)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_request_recorded_in_its_transaction_is_not_renewed_while_it_is_open(
    database: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    options: dict[str, Any] = {}
    ledger_name = "ledger"
    if database == "postgres":
        postgres_url: str = request.getfixturevalue("postgres_url")
        url = make_url(postgres_url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        options["table"] = request.getfixturevalue("table")
        ledger_name = new_table()
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    engine = create_async_engine(url)
    ledger = Table(ledger_name, MetaData(), Column("id", Integer, primary_key=True))
    async with engine.begin() as connection:
        await connection.run_sync(ledger.create)
    store: Store = store_for(engine, **options)  # type: ignore[assignment]
    calls = Calls()
    renewals_before_record: list[int] = []
    api = FastAPI()

    @api.post("/charge")
    async def charge() -> JSONResponse:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(insert(ledger))
            response = JSONResponse({"charged": True}, status_code=201)
            renewals_before_record.append(calls.store_calls.count("renew"))
            await record_async(session, response)
            await asyncio.sleep(LEASE * 3)  # the transaction stays open for three leases: nine sweeps
        return response

    api.add_middleware(IdempotencyMiddleware, store=store, observer=calls, lease=LEASE)
    try:
        transport = httpx.ASGITransport(api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.post("/charge", headers={"Idempotency-Key": "k"})
            again = await client.post("/charge", headers={"Idempotency-Key": "k"})
        assert first.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert renewals_before_record == [0]
        assert calls.store_calls == ["claim", "claim"]  # no renewal, no completion: the commit completed the key
    finally:
        await store.close()
        await engine.dispose()
        if database == "postgres":
            drop_table(postgres_url, ledger_name)
