"""An app that cannot know whether its operation happened: the key is kept, in the "outcome unknown" state, and
every retry gets a 503 ``outcome-unknown`` problem until the record expires or an operator resolves it, never a
second execution."""

from __future__ import annotations

import math
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from idempo import IdempotencyMiddleware, MemoryStore, OutcomeUnknownError, State, mark_outcome_unknown
from idempo._core.codec import OutcomeUnknownMarker, decode_response
from idempo.asgi import Receive, Scope, Send
from tests.support.middleware import CountingApp, client_for, problem_of

KEY = {"Idempotency-Key": "unknown-1"}


class Payments:
    """A Starlette app whose provider call times out after the request was sent: the charge may have happened.
    With *store*, the middleware is added the usual way (``add_middleware``), inside Starlette's error handling."""

    def __init__(self, *, how: str, sync: bool = False, **options: Any) -> None:
        self.calls = 0
        self.how = how
        endpoint = self.pay_sync if sync else self.pay
        middleware = [Middleware(IdempotencyMiddleware, **options)] if options else []
        self.app = Starlette(routes=[Route("/pay", endpoint, methods=["POST"])], middleware=middleware)

    async def pay(self, request: Request) -> JSONResponse:
        return self.pay_sync(request)

    def pay_sync(self, request: Request) -> JSONResponse:
        self.calls += 1
        if self.how == "raise":
            raise OutcomeUnknownError("the payment provider timed out after the charge was sent")
        mark_outcome_unknown()
        return JSONResponse({"detail": "the provider timed out; we do not know yet"}, status_code=504)


@pytest.mark.parametrize("sync", [False, True], ids=["async endpoint", "sync endpoint (thread pool)"])
@pytest.mark.parametrize("how", ["raise", "mark"])
async def test_an_unknown_outcome_keeps_the_key_and_retries_get_503_outcome_unknown(how: str, sync: bool) -> None:
    store = MemoryStore()
    payments = Payments(how=how, sync=sync, store=store, ttl=600, unknown_outcome_ttl=120)
    async with client_for(payments.app) as client:
        first = await client.post("/pay", json={"amount": 1}, headers=KEY)
        retries = [await client.post("/pay", json={"amount": 1}, headers=KEY) for _ in range(3)]
    if how == "raise":
        document = problem_of(first, 503, "outcome-unknown")
        assert "timed out" in document["detail"]
    else:
        assert first.status_code == 504  # what the app answered reaches the client
    for retry in retries:
        problem_of(retry, 503, "outcome-unknown")
        assert 1 <= int(retry.headers["retry-after"]) <= 120
    assert payments.calls == 1
    (record,) = [record async for record in store.scan()]
    assert record.state is State.COMPLETED
    assert record.payload is not None
    assert decode_response(record.payload) == OutcomeUnknownMarker(503 if how == "raise" else 504)
    assert record.expires_at - record.created_at == pytest.approx(120, abs=5)


async def test_raised_through_starlettes_error_handling_the_key_is_still_kept() -> None:
    """Wrapped around the whole app, the middleware sees Starlette's 500 before the exception: the exception
    marked the request when it was made, so the key is kept all the same, and the client is told 503
    outcome-unknown rather than a 500 that its retrying client would take for a failure (and re-key)."""
    store = MemoryStore()
    payments = Payments(how="raise")
    async with client_for(IdempotencyMiddleware(payments.app, store=store), raise_app_exceptions=False) as client:
        first = await client.post("/pay", json={}, headers=KEY)
        retry = await client.post("/pay", json={}, headers=KEY)
    problem_of(first, 503, "outcome-unknown")  # not Starlette's 500, which a client would take as a failure
    problem_of(retry, 503, "outcome-unknown")
    assert payments.calls == 1


async def test_the_first_answer_carries_the_whole_unknown_outcome_ttl_as_retry_after() -> None:
    payments = Payments(how="raise", store=MemoryStore(), unknown_outcome_ttl=90.5)
    async with client_for(payments.app) as client:
        first = await client.post("/pay", json={}, headers=KEY)
    assert first.headers["retry-after"] == str(math.ceil(90.5))


async def test_another_request_under_that_key_is_still_a_422() -> None:
    async with client_for(Payments(how="raise", store=MemoryStore()).app) as client:
        await client.post("/pay", json={"amount": 1}, headers=KEY)
        other = await client.post("/pay", json={"amount": 2}, headers=KEY)
    problem_of(other, 422, "key-reused")


async def test_without_unknown_outcome_ttl_the_key_is_kept_for_the_whole_ttl() -> None:
    store = MemoryStore()
    async with client_for(Payments(how="mark", store=store, ttl=3600).app) as client:
        await client.post("/pay", json={}, headers=KEY)
    (record,) = [record async for record in store.scan()]
    assert record.expires_at - record.created_at == pytest.approx(3600, abs=5)


async def test_the_mark_wins_over_a_5xx_which_would_otherwise_release_the_key() -> None:
    """A 502 alone releases the key (the operation failed, a retry runs); with the mark it is kept."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        mark_outcome_unknown()
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"upstream broke"})

    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/pay", content=b"x", headers=KEY)
        retry = await client.post("/pay", content=b"x", headers=KEY)
    assert first.status_code == 502
    assert first.content == b"upstream broke"
    problem_of(retry, 503, "outcome-unknown")
    assert calls == 1


async def test_raised_after_the_response_started_the_key_is_still_kept() -> None:
    """The server aborts the response; the key is not released, so the retry does not run again."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise OutcomeUnknownError

    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store), raise_app_exceptions=False) as client:
        await client.post("/pay", content=b"x", headers=KEY)
        retry = await client.post("/pay", content=b"x", headers=KEY)
    problem_of(retry, 503, "outcome-unknown")
    assert calls == 1


async def test_an_unknown_outcome_is_never_answered_from_the_cache() -> None:
    """An operator may resolve it at any time: every retry asks the store."""
    store = MemoryStore()
    app = CountingApp()
    middleware = IdempotencyMiddleware(Payments(how="raise").app, store=store, cache_size=100)
    async with client_for(middleware, raise_app_exceptions=False) as client:
        await client.post("/pay", json={}, headers=KEY)
        problem_of(await client.post("/pay", json={}, headers=KEY), 503, "outcome-unknown")
        (record,) = [record async for record in store.scan()]
        assert await store.delete(record.key)  # what `idempo keys resolve --not-run` does
        middleware.app = app
        again = await client.post("/pay", json={}, headers=KEY)
    assert again.status_code == 200
    assert app.calls == 1


async def test_outside_a_keyed_request_the_mark_changes_nothing() -> None:
    payments = Payments(how="mark")
    async with client_for(IdempotencyMiddleware(payments.app, store=MemoryStore())) as client:
        first = await client.post("/pay", json={})
        second = await client.post("/pay", json={})
    assert (first.status_code, second.status_code) == (504, 504)
    assert payments.calls == 2
