"""The observer hook (``idempo.observe``): one outcome per HTTP request, and every store call timed."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from idempo import IdempotencyMiddleware, MemoryStore
from idempo.observe import OUTCOMES, Observer, Outcome, StoreOperation
from tests.support.middleware import CountingApp, FailingStore, client_for


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.calls: list[tuple[StoreOperation, bool]] = []

    def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
        assert scope["type"] == "http"
        self.outcomes.append(outcome)

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        assert seconds >= 0
        self.calls.append((operation, error is not None))


def test_a_recorder_is_an_observer() -> None:
    assert isinstance(Recorder(), Observer)
    assert len(set(OUTCOMES)) == 9


async def test_every_outcome_is_told_once_per_request() -> None:
    recorder = Recorder()
    app = CountingApp()
    middleware = IdempotencyMiddleware(
        app, store=MemoryStore(), observer=recorder, require_key=lambda path: path == "/strict", max_request_bytes=10
    )
    async with client_for(middleware) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.post("/")).status_code == 200
        assert (await client.post("/", headers={"Idempotency-Key": "k1"}, content=b"a")).status_code == 200
        assert (await client.post("/", headers={"Idempotency-Key": "k1"}, content=b"a")).status_code == 200
        assert (await client.post("/", headers={"Idempotency-Key": "k1"}, content=b"b")).status_code == 422
        assert (await client.post("/", headers={"Idempotency-Key": "bad key"})).status_code == 400
        assert (await client.post("/strict")).status_code == 400
        assert (await client.post("/", headers={"Idempotency-Key": "k2"}, content=b"x" * 11)).status_code == 413
    assert recorder.outcomes == [
        "passthrough",
        "passthrough",
        "executed",
        "replayed",
        "mismatch",
        "bad_key",
        "bad_key",
        "too_large",
    ]
    assert app.calls == 3
    # A fresh key: a claim and a complete; a replay and a mismatch: a claim each.
    assert recorder.calls == [("claim", False), ("complete", False), ("claim", False), ("claim", False)]


async def test_a_conflict_and_a_release_are_told() -> None:
    recorder = Recorder()
    app = CountingApp(gate=asyncio.Event(), status=500)
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), observer=recorder)
    async with client_for(middleware) as client:
        first = asyncio.create_task(client.post("/", headers={"Idempotency-Key": "k"}))
        await app.started.wait()
        assert (await client.post("/", headers={"Idempotency-Key": "k"})).status_code == 409
        assert app.gate is not None
        app.gate.set()
        assert (await first).status_code == 500
    assert recorder.outcomes == ["executed", "conflict"]
    assert recorder.calls == [("claim", False), ("claim", False), ("release", False)]


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_a_failing_store_is_a_store_error_and_its_call_is_timed_as_failed(policy: Any) -> None:
    recorder = Recorder()
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=FailingStore(), observer=recorder, on_store_error=policy)
    async with client_for(middleware) as client:
        response = await client.post("/", headers={"Idempotency-Key": "k"})
    assert response.status_code == (503 if policy == "fail_closed" else 200)
    assert recorder.outcomes == ["store_error"]
    assert recorder.calls == [("claim", True)]


async def test_an_observer_that_raises_never_breaks_a_request(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
            raise RuntimeError("observer bug")

        def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
            raise RuntimeError("observer bug")

    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), observer=Broken())
    async with client_for(middleware) as client:
        assert (await client.post("/", headers={"Idempotency-Key": "k"})).status_code == 200
        replay = await client.post("/", headers={"Idempotency-Key": "k"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1
    assert "an observer failed" in caplog.text
