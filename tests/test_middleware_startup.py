"""The key is readable on every request the middleware lets through (``None`` without one; Starlette and Litestar),
and the store is asked once at start-up, so that a wrong address fails the start-up instead of the first keyed
request."""

from __future__ import annotations

import logging
from typing import Any, cast

import litestar
import pytest
from litestar.middleware import DefineMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idempo import IdempotencyMiddleware, MemoryStore, store_from_url
from idempo.asgi import ASGIApp
from tests.support.middleware import client_for
from tests.support.redis_cluster import free_port


def _app(**options: Any) -> Starlette:
    async def charge(request: Request) -> JSONResponse:
        return JSONResponse({"key": request.state.idempotency_key})

    app = Starlette(routes=[Route("/charges", charge, methods=["GET", "POST"])])
    app.add_middleware(IdempotencyMiddleware, **options)
    return app


@pytest.mark.parametrize(("method", "headers"), [("POST", {}), ("GET", {}), ("GET", {"Idempotency-Key": "k"})])
async def test_a_request_let_through_reads_its_key_as_none(method: str, headers: dict[str, str]) -> None:
    async with client_for(_app(store=MemoryStore())) as client:
        response = await client.request(method, "/charges", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"key": None}


async def test_a_keyed_request_reads_its_key() -> None:
    async with client_for(_app(store=MemoryStore())) as client:
        response = await client.post("/charges", headers={"Idempotency-Key": "k-1"})
    assert response.json() == {"key": "k-1"}


async def _start(app: Any) -> dict[str, Any]:
    """Run the lifespan's start-up; the message the server is told."""
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent[0]


def _unreachable_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0?timeout=1&connect_timeout=1"


async def test_a_store_that_does_not_answer_fails_the_start_up() -> None:
    url = _unreachable_redis()
    message = await _start(_app(store=url))
    assert message["type"] == "lifespan.startup.failed"
    assert "does not answer" in message["message"]
    assert "startup_check='warn'" in message["message"]


async def test_with_startup_check_warn_it_starts_anyway(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="idempo"):
        message = await _start(_app(store=_unreachable_redis(), startup_check="warn"))
    assert message["type"] == "lifespan.startup.complete"
    assert any("starting anyway" in record.getMessage() for record in caplog.records)


async def test_with_startup_check_off_the_store_is_not_asked() -> None:
    message = await _start(_app(store=_unreachable_redis(), startup_check="off"))
    assert message["type"] == "lifespan.startup.complete"


async def test_a_store_that_answers_starts(redis_url: str) -> None:
    store = store_from_url(redis_url)
    try:
        assert (await _start(_app(store=store)))["type"] == "lifespan.startup.complete"
    finally:
        await store.close()


def _litestar_app(*, wrapped: bool, **options: Any) -> ASGIApp:
    @litestar.post("/charges", status_code=200)
    async def charge(request: litestar.Request[Any, Any, Any]) -> dict[str, str | None]:
        key: str | None = request.state.idempotency_key
        return {"key": key}

    if wrapped:  # the whole application: the lifespan goes through the middleware
        return IdempotencyMiddleware(cast(ASGIApp, litestar.Litestar([charge], logging_config=None)), **options)
    middleware = [DefineMiddleware(IdempotencyMiddleware, **options)]  # type: ignore[arg-type]
    return cast(ASGIApp, litestar.Litestar([charge], middleware=middleware, logging_config=None))


@pytest.mark.parametrize("wrapped", [False, True], ids=["DefineMiddleware", "wrapped"])
async def test_litestar_reads_the_key_as_none_without_one(wrapped: bool) -> None:
    async with client_for(_litestar_app(wrapped=wrapped, store=MemoryStore())) as client:
        unkeyed = await client.post("/charges", json={})
        keyed = await client.post("/charges", json={}, headers={"Idempotency-Key": "k-1"})
    assert (unkeyed.status_code, unkeyed.json()) == (200, {"key": None})
    assert keyed.json() == {"key": "k-1"}


async def test_a_wrapped_litestar_app_checks_the_store_at_start_up() -> None:
    message = await _start(_litestar_app(wrapped=True, store=_unreachable_redis()))
    assert message["type"] == "lifespan.startup.failed"
    assert "does not answer" in message["message"]
