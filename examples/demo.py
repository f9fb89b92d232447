"""A small payments API protected by idempo, on the embedded SQLite store.

``python examples/demo.py`` (``make walkthrough``) walks through the HTTP contract in-process and prints what a
client sees: a charge, its retry (replayed, not charged again), a double click while the first is running (409), the key
reused for another amount (422), and a malformed key (400).

``python examples/demo.py --serve`` serves the same app with uvicorn on http://127.0.0.1:8000 so that you can
try it with curl (``idempo demo``, i.e. ``make demo``, serves a web page to try it in a browser)::

    KEY=$(python -c 'import uuid; print(uuid.uuid4())')   # a random key, once per operation
    curl -i -X POST localhost:8000/charges -H "Idempotency-Key: $KEY" -H 'content-type: application/json' \\
         -d '{"amount": 1000}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel

from idempo import IdempotencyMiddleware, SQLiteStore


class ChargeIn(BaseModel):
    amount: int
    currency: str = "eur"


def create_app(
    store: SQLiteStore, *, slow: asyncio.Event | None = None, entered: asyncio.Event | None = None
) -> FastAPI:
    """The payments API. *slow*, when given, holds every charge until it is set (to show a double click);
    *entered* is set when a charge reaches the handler."""
    app = FastAPI(title="idempo demo payments")
    charges: list[dict[str, object]] = []

    @app.post("/charges", status_code=201)
    async def create_charge(charge: ChargeIn, request: Request) -> dict[str, object]:
        if entered is not None:
            entered.set()
        if slow is not None:
            await slow.wait()
        record = {
            "id": f"ch_{len(charges) + 1}",
            "amount": charge.amount,
            "currency": charge.currency,
            "idempotency_key": request.state.idempotency_key,
        }
        charges.append(record)
        return record

    @app.get("/charges")
    async def list_charges() -> list[dict[str, object]]:
        return charges

    app.add_middleware(IdempotencyMiddleware, store=store)
    return app


def _show(title: str, response: httpx.Response) -> None:
    replayed = response.headers.get("idempotent-replayed")
    note = "  (replayed)" if replayed else ""
    print(f"\n--- {title}\n{response.status_code}{note}  {response.text}")


async def walkthrough(db: Path) -> None:
    """Show each row of the contract against an in-process app."""
    store = SQLiteStore(db)
    hold, entered = asyncio.Event(), asyncio.Event()
    app = create_app(store, slow=hold, entered=entered)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        first_key = str(uuid.uuid4())  # keys are random: a guessable one is someone else's to guess
        key = {"Idempotency-Key": first_key}
        hold.set()
        _show(
            f"1. POST /charges with Idempotency-Key: {first_key}",
            await client.post("/charges", json={"amount": 1000}, headers=key),
        )
        _show(
            "2. the same request again (a retry after a timeout)",
            await client.post("/charges", json={"amount": 1000}, headers=key),
        )

        hold.clear()
        entered.clear()
        click = {"Idempotency-Key": str(uuid.uuid4())}
        first = asyncio.create_task(client.post("/charges", json={"amount": 500}, headers=click))
        await entered.wait()  # the first click is in the handler, waiting for `hold`
        _show(
            "3. a double click while the first is still running",
            await client.post("/charges", json={"amount": 500}, headers=click),
        )
        hold.set()
        _show("   ... and the first click, once it finishes", await first)

        _show(
            "4. the first key reused for another amount",
            await client.post("/charges", json={"amount": 9999}, headers=key),
        )
        _show(
            "5. a malformed key",
            await client.post("/charges", json={"amount": 1}, headers={"Idempotency-Key": "has space"}),
        )

        charges = (await client.get("/charges")).json()
        print(f"\n--- charges made: {len(charges)} (two orders, however many requests)")
        print(json.dumps(charges, indent=2))
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="serve the app with uvicorn instead")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", type=Path, help="the SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "idempo-demo.db"
        if args.serve:
            import uvicorn

            print(f"idempo demo: http://{args.host}:{args.port}/docs  (store: sqlite:///{db})")
            uvicorn.run(create_app(SQLiteStore(db)), host=args.host, port=args.port)
        else:
            asyncio.run(walkthrough(db))


if __name__ == "__main__":
    main()
