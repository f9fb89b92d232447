"""``IdempotencyMiddleware`` in FastAPI, Starlette and Litestar applications, installed the way each one expects.

Each framework gets the same small payments API; every test runs against all of them:

* FastAPI: ``app.add_middleware(IdempotencyMiddleware, store=...)``
* Starlette: ``Starlette(middleware=[Middleware(IdempotencyMiddleware, store=...)])`` and ``app.add_middleware``
* Litestar: ``Litestar(middleware=[DefineMiddleware(IdempotencyMiddleware, store=...)])`` (the idiomatic way;
  Litestar runs it for matched routes only), and wrapping the whole app, ``IdempotencyMiddleware(litestar_app, ...)``
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import fastapi
import httpx
import litestar
import pytest
from litestar.middleware import DefineMiddleware
from litestar.params import JSONBody
from litestar.response import Stream
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from idempo import IdempotencyMiddleware, MemoryStore
from idempo.asgi import ASGIApp
from tests.support.middleware import client_for, problem_of, stored_keys

STREAM_CHUNKS = [b"line 1\n", b"line 2\n", bytes(range(256)), b"end\n"]


@dataclass
class Payments:
    """What the handlers did: the side effects whose count proves "exactly once"."""

    charges: int = 0
    failures: int = 0
    throttled: int = 0
    streams: int = 0
    keys: list[str | None] = field(default_factory=list)
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def charge(self, key: str | None, amount: int) -> dict[str, Any]:
        self.charges += 1
        self.keys.append(key)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return {"charge": self.charges, "amount": amount, "key": key}

    async def stream(self) -> AsyncIterator[bytes]:
        self.streams += 1
        for chunk in STREAM_CHUNKS:
            yield chunk


class Charge(BaseModel):
    amount: int


# -- FastAPI --------------------------------------------------------------------------------------------------


def fastapi_app(payments: Payments, store: MemoryStore) -> ASGIApp:
    app = fastapi.FastAPI()
    app.add_middleware(IdempotencyMiddleware, store=store)

    @app.post("/charges", status_code=201)
    async def create_charge(charge: Charge, request: fastapi.Request, response: fastapi.Response) -> dict[str, Any]:
        result = await payments.charge(getattr(request.state, "idempotency_key", None), charge.amount)
        response.headers["Location"] = f"/charges/{result['charge']}"
        response.headers["X-Ledger"] = "main"
        return result

    @app.post("/fail")
    async def fail() -> None:
        payments.failures += 1
        raise RuntimeError("the card network is down")

    @app.post("/throttled")
    async def throttled() -> None:
        payments.throttled += 1
        raise fastapi.HTTPException(status_code=429, detail="slow down")

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(payments.stream(), media_type="application/octet-stream")

    return app


# -- Starlette ------------------------------------------------------------------------------------------------


def _starlette_routes(payments: Payments) -> list[Route]:
    async def create_charge(request: StarletteRequest) -> Response:
        body = await request.json()
        result = await payments.charge(getattr(request.state, "idempotency_key", None), body["amount"])
        headers = {"Location": f"/charges/{result['charge']}", "X-Ledger": "main"}
        return JSONResponse(result, status_code=201, headers=headers)

    async def fail(request: StarletteRequest) -> Response:
        payments.failures += 1
        raise RuntimeError("the card network is down")

    async def throttled(request: StarletteRequest) -> Response:
        payments.throttled += 1
        return JSONResponse({"detail": "slow down"}, status_code=429)

    async def stream(request: StarletteRequest) -> Response:
        return StreamingResponse(payments.stream(), media_type="application/octet-stream")

    return [
        Route("/charges", create_charge, methods=["POST"]),
        Route("/fail", fail, methods=["POST"]),
        Route("/throttled", throttled, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
    ]


def starlette_app(payments: Payments, store: MemoryStore) -> ASGIApp:
    return Starlette(routes=_starlette_routes(payments), middleware=[Middleware(IdempotencyMiddleware, store=store)])


def starlette_add_middleware_app(payments: Payments, store: MemoryStore) -> ASGIApp:
    app = Starlette(routes=_starlette_routes(payments))
    app.add_middleware(IdempotencyMiddleware, store=store)
    return app


# -- Litestar -------------------------------------------------------------------------------------------------


def _litestar(payments: Payments, middleware: list[DefineMiddleware]) -> ASGIApp:
    @litestar.post("/charges")
    async def create_charge(
        request: litestar.Request[Any, Any, Any], data: JSONBody[dict[str, Any]]
    ) -> litestar.Response[Any]:
        result = await payments.charge(getattr(request.state, "idempotency_key", None), data["amount"])
        headers = {"Location": f"/charges/{result['charge']}", "X-Ledger": "main"}
        return litestar.Response(result, status_code=201, headers=headers)

    @litestar.post("/fail")
    async def fail() -> None:
        payments.failures += 1
        raise RuntimeError("the card network is down")

    @litestar.post("/throttled")
    async def throttled() -> litestar.Response[Any]:
        payments.throttled += 1
        return litestar.Response({"detail": "slow down"}, status_code=429)

    @litestar.post("/stream", status_code=200)
    async def stream() -> Stream:
        return Stream(payments.stream(), media_type="application/octet-stream")

    # logging_config=None: Litestar would otherwise configure the root logger for the whole test session.
    handlers = [create_charge, fail, throttled, stream]
    app = litestar.Litestar(route_handlers=handlers, middleware=middleware, logging_config=None)
    return cast(ASGIApp, app)  # see litestar_app() about the ASGI types


def litestar_app(payments: Payments, store: MemoryStore) -> ASGIApp:
    # Litestar types its ASGI scopes and messages as TypedDicts, which mypy does not accept where a
    # MutableMapping (Starlette's and idempo's ASGI types) is expected; at run time they are the same dicts.
    return _litestar(payments, [DefineMiddleware(IdempotencyMiddleware, store=store)])  # type: ignore[arg-type]


def litestar_wrapped_app(payments: Payments, store: MemoryStore) -> ASGIApp:
    return IdempotencyMiddleware(_litestar(payments, []), store=store)


FRAMEWORKS: dict[str, Callable[[Payments, MemoryStore], ASGIApp]] = {
    "fastapi": fastapi_app,
    "starlette": starlette_app,
    "starlette-add_middleware": starlette_add_middleware_app,
    "litestar": litestar_app,
    "litestar-wrapped": litestar_wrapped_app,
}


@dataclass
class Service:
    payments: Payments
    store: MemoryStore
    client: httpx.AsyncClient


@pytest.fixture(params=list(FRAMEWORKS))
async def service(request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    payments = Payments()
    store = MemoryStore()
    app = FRAMEWORKS[request.param](payments, store)
    async with client_for(app, raise_app_exceptions=False) as client:
        yield Service(payments, store, client)


def keyed(key: str = "key-1", **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


# -- tests ----------------------------------------------------------------------------------------------------


async def test_first_request_runs_and_retries_replay_it(service: Service) -> None:
    client, payments = service.client, service.payments
    first = await client.post("/charges", json={"amount": 10}, headers=keyed())
    retries = [await client.post("/charges", json={"amount": 10}, headers=keyed()) for _ in range(3)]
    assert first.status_code == 201
    assert first.json() == {"charge": 1, "amount": 10, "key": "key-1"}
    assert first.headers["location"] == "/charges/1"
    assert "idempotent-replayed" not in first.headers
    for retry in retries:
        assert retry.status_code == 201
        assert retry.content == first.content
        assert retry.headers["location"] == "/charges/1"
        assert retry.headers["x-ledger"] == "main"
        assert retry.headers["content-type"] == first.headers["content-type"]
        assert retry.headers["idempotent-replayed"] == "true"
    assert payments.charges == 1


async def test_handler_sees_the_key_in_request_state(service: Service) -> None:
    await service.client.post("/charges", json={"amount": 1}, headers=keyed('"quoted-key"'))
    await service.client.post("/charges", json={"amount": 1}, headers=keyed("bare-key"))
    await service.client.post("/charges", json={"amount": 1})
    assert service.payments.keys == ["quoted-key", "bare-key", None]


async def test_requests_without_a_key_pass_through(service: Service) -> None:
    for _ in range(2):
        response = await service.client.post("/charges", json={"amount": 3})
        assert response.status_code == 201
        assert "idempotent-replayed" not in response.headers
    assert service.payments.charges == 2
    assert stored_keys(service.store) == set()


async def test_key_reused_with_another_body_is_422_problem(service: Service) -> None:
    await service.client.post("/charges", json={"amount": 10}, headers=keyed())
    reused = await service.client.post("/charges", json={"amount": 99}, headers=keyed())
    problem_of(reused, 422, "key-reused")
    assert service.payments.charges == 1


async def test_malformed_key_is_400_problem(service: Service) -> None:
    response = await service.client.post("/charges", json={"amount": 10}, headers=keyed("not valid"))
    problem_of(response, 400, "invalid-key")
    assert service.payments.charges == 0


async def test_same_key_while_running_is_409(service: Service) -> None:
    service.payments.gate = gate = asyncio.Event()
    client = service.client
    first = asyncio.create_task(client.post("/charges", json={"amount": 10}, headers=keyed()))
    await service.payments.started.wait()
    conflict = await client.post("/charges", json={"amount": 10}, headers=keyed())
    gate.set()
    done = await first
    problem_of(conflict, 409, "in-progress")
    assert "retry-after" in conflict.headers
    assert done.status_code == 201
    assert service.payments.charges == 1


async def test_handler_exception_is_not_stored_and_the_retry_runs_again(service: Service) -> None:
    first = await service.client.post("/fail", headers=keyed())
    retry = await service.client.post("/fail", headers=keyed())
    assert first.status_code == retry.status_code == 500
    assert "idempotent-replayed" not in retry.headers
    assert service.payments.failures == 2
    assert stored_keys(service.store) == set()


async def test_429_from_the_handler_is_not_stored(service: Service) -> None:
    first = await service.client.post("/throttled", headers=keyed())
    retry = await service.client.post("/throttled", headers=keyed())
    assert first.status_code == retry.status_code == 429
    assert service.payments.throttled == 2


async def test_streaming_response_is_replayed_byte_for_byte(service: Service) -> None:
    first = await service.client.post("/stream", headers=keyed())
    retry = await service.client.post("/stream", headers=keyed())
    assert first.status_code == retry.status_code == 200
    assert first.content == retry.content == b"".join(STREAM_CHUNKS)
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert service.payments.streams == 1


async def test_get_with_a_key_passes_through(service: Service) -> None:
    # No GET route: the framework's own 404/405 reaches the client, and nothing is recorded.
    for _ in range(2):
        response = await service.client.get("/charges", headers=keyed())
        assert response.status_code == 405
        assert "idempotent-replayed" not in response.headers
    assert stored_keys(service.store) == set()


async def test_fastapi_validation_error_is_the_apps_answer_and_is_replayed() -> None:
    payments = Payments()
    async with client_for(fastapi_app(payments, MemoryStore())) as client:
        first = await client.post("/charges", json={"amount": "lots"}, headers=keyed())
        retry = await client.post("/charges", json={"amount": "lots"}, headers=keyed())
    assert first.status_code == 422
    assert first.headers["content-type"] == "application/json"  # FastAPI's own 422, not the middleware's
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert payments.charges == 0


async def test_fastapi_require_key_is_enforced_before_the_app() -> None:
    payments = Payments()
    app = fastapi.FastAPI()
    app.add_middleware(IdempotencyMiddleware, store=MemoryStore(), require_key=lambda path: path == "/charges")

    @app.post("/charges")
    async def create_charge(charge: Charge) -> dict[str, Any]:
        return await payments.charge(None, charge.amount)

    @app.post("/previews")
    async def preview(charge: Charge) -> dict[str, Any]:
        return {"amount": charge.amount}

    async with client_for(app) as client:
        problem_of(await client.post("/charges", json={"amount": 1}), 400, "missing-key")
        assert (await client.post("/previews", json={"amount": 1})).json() == {"amount": 1}
    assert payments.charges == 0
