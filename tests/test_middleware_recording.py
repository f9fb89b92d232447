"""When the store fails just as the outcome is recorded: the client still gets its response, and the outcome is
recorded once the store is back, as long as the lease lasts; after that, a retry runs again (never a hang)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from idempo import IdempotencyMiddleware, MemoryStore, StoreError
from tests.support.middleware import CountingApp, client_for

KEY = {"Idempotency-Key": "record-1"}


class FlakyStore(MemoryStore):
    """A memory store whose ``complete`` and ``release`` fail the first *failures* times, and which sets
    ``recorded`` once one of them went through."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0
        self.recorded = asyncio.Event()

    def _attempt(self) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise StoreError("the store is down")

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self._attempt()
        done = await super().complete(key, token, payload, ttl=ttl)
        self.recorded.set()
        return done

    async def release(self, key: str, token: str) -> bool:
        self._attempt()
        done = await super().release(key, token)
        self.recorded.set()
        return done


async def test_a_completion_that_failed_is_recorded_when_the_store_comes_back() -> None:
    """The first response goes out at once; the completion lands on the third try; the retry is a replay."""
    store = FlakyStore(failures=2)
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        first = await client.post("/pay", content=b"{}", headers=KEY)
        assert first.status_code == 200
        async with asyncio.timeout(10):
            await store.recorded.wait()
        again = await client.post("/pay", content=b"{}", headers=KEY)
    assert store.attempts == 3
    assert app.calls == 1
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"


async def test_until_it_is_recorded_a_retry_is_told_to_wait_not_run() -> None:
    """While the outcome is not yet recorded, the key is still held: 409, never a second execution."""
    store = FlakyStore(failures=1000)
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store, lease=30)) as client:
        await client.post("/pay", content=b"{}", headers=KEY)
        again = await client.post("/pay", content=b"{}", headers=KEY)
    assert again.status_code == 409
    assert app.calls == 1


async def test_a_release_that_failed_is_retried_so_that_a_retry_can_run_again() -> None:
    """A 500 is released; the release fails once, lands on the next try, and then the retry runs."""
    store = FlakyStore(failures=1)
    app = CountingApp(status=500)
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        await client.post("/pay", content=b"{}", headers=KEY)
        async with asyncio.timeout(10):
            await store.recorded.wait()
        await client.post("/pay", content=b"{}", headers=KEY)
    assert app.calls == 2


async def test_recording_gives_up_when_the_lease_runs_out(caplog: pytest.LogCaptureFixture) -> None:
    """A store that stays down: the middleware stops trying once the lease is over, says so, and a retry after
    that runs the operation again (the store could not keep its outcome)."""
    store = FlakyStore(failures=1000)
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=store, lease=0.3)
    with caplog.at_level(logging.ERROR, logger="idempo"):
        async with client_for(middleware) as client:
            await client.post("/pay", content=b"{}", headers=KEY)
            async with asyncio.timeout(10):
                while middleware._background:
                    await asyncio.gather(*middleware._background)
            store.failures = 0  # the store is back, too late for the first request
            await asyncio.sleep(0.3)  # the lease itself running out is what this test is about
            again = await client.post("/pay", content=b"{}", headers=KEY)
    assert any("gave up recording" in record.getMessage() for record in caplog.records)
    assert again.status_code == 200
    assert app.calls == 2
