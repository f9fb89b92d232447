"""When the store fails just as the outcome is recorded: the client still gets its response, and the outcome is
recorded once the store is back, as long as the lease lasts; after that, a retry runs again (never a hang). When the
request is cancelled while the store has the call: the call is made again in the background. And at shutdown, what
is still being recorded is waited for before the app's own shutdown."""

from __future__ import annotations

import asyncio
import logging

import pytest

from idempo import IdempotencyMiddleware, MemoryStore, StoreError
from idempo.asgi import Message, Receive, Scope, Send
from tests.support.middleware import CountingApp, HeldStore, client_for

KEY = {"Idempotency-Key": "record-1"}


class FlakyStore(MemoryStore):
    """A memory store whose ``complete`` and ``release`` fail the first *failures* times, and which sets
    ``recorded`` once one of them went through."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0
        self.recorded = asyncio.Event()
        self.closed = False  # set by a test's app at its shutdown
        self.recorded_while_open = False

    def _attempt(self) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise StoreError("the store is down")

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self._attempt()
        done = await super().complete(key, token, payload, ttl=ttl)
        self.recorded_while_open = not self.closed
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


# -- cancelled while the store has the call ----------------------------------------------------------------------


async def _cancel_while_held(middleware: IdempotencyMiddleware, store: HeldStore) -> None:
    """Send a request, cancel it while the store holds its call, then let the store go on and wait for what the
    middleware does in the background."""
    async with client_for(middleware) as client:
        await store.cut_short(asyncio.create_task(client.post("/pay", content=b"{}", headers=KEY)))
    async with asyncio.timeout(10):
        while middleware._background:
            await asyncio.gather(*middleware._background)


@pytest.mark.parametrize("made", [False, True], ids=["not-made", "made"])
async def test_a_request_cancelled_while_its_outcome_is_recorded_still_has_it_recorded(
    made: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The app ran; the completion was under way when the request was cancelled (a worker shutting down, a
    disconnect an outer layer turns into a cancellation). Lost with the request, the outcome would leave the key in
    progress, and once the lease ran out a retry would run the operation again: it is made again in the
    background, whether the cancelled call had been made (its answer lost: nothing changes, nothing is said of a
    takeover) or not."""
    store = HeldStore("complete", made=made)
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=store, lease=30)
    with caplog.at_level(logging.INFO, logger="idempo"):
        await _cancel_while_held(middleware, store)
    assert store.calls == ["claim", "complete", "complete"]
    assert not any("taken over" in record.getMessage() for record in caplog.records)
    assert any("its outcome was recorded in the background" in record.getMessage() for record in caplog.records)
    async with client_for(middleware) as client:
        again = await client.post("/pay", content=b"{}", headers=KEY)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_request_cancelled_while_its_key_is_claimed_gives_the_key_back() -> None:
    """The claim was made, its answer lost to a cancellation: the app never ran, so the key is released (in the
    background) rather than held for a whole lease; the retry runs at once, and only then does the app run."""
    store = HeldStore("claim", made=True)
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=store, lease=30)
    await _cancel_while_held(middleware, store)
    assert store.calls == ["claim", "release"]
    assert app.calls == 0
    async with client_for(middleware) as client:
        again = await client.post("/pay", content=b"{}", headers=KEY)
    assert again.status_code == 200
    assert "idempotent-replayed" not in again.headers
    assert app.calls == 1


class WithLifespan:
    """*app* behind a lifespan that starts at once and, at shutdown, closes its store (as an app's own shutdown
    may), as Starlette's does."""

    def __init__(self, app: CountingApp, store: FlakyStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        self.store.closed = True
        await send({"type": "lifespan.shutdown.complete"})


async def test_the_shutdown_waits_for_outcomes_still_being_recorded() -> None:
    """A completion that failed is being tried again in the background when the server shuts down: the middleware
    hands the shutdown to the app only once the outcome has landed (before the app's own shutdown closes the
    store; the process would otherwise end with the outcome in its memory, and a retry after the lease would run
    the operation again)."""
    store = FlakyStore(failures=2)
    app = WithLifespan(CountingApp(), store)
    middleware = IdempotencyMiddleware(app, store=store, startup_check="off")
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    told: asyncio.Queue[Message] = asyncio.Queue()
    lifespan = asyncio.create_task(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, told.put))
    async with asyncio.timeout(10):
        await to_app.put({"type": "lifespan.startup"})
        assert (await told.get())["type"] == "lifespan.startup.complete"
        async with client_for(middleware) as client:
            response = await client.post("/pay", content=b"{}", headers=KEY)
        assert response.status_code == 200
        assert not store.recorded.is_set()  # the completion failed; it is being tried again
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await told.get())["type"] == "lifespan.shutdown.complete"
        await lifespan
    assert store.recorded.is_set()
    assert store.recorded_while_open
    assert store.attempts == 3
    async with asyncio.timeout(10):
        await middleware.finish_recording()  # nothing left: at once


async def test_finish_recording_bounded_by_the_caller_leaves_the_recording_going() -> None:
    """Waited for under a timeout of the caller's that runs out (the store is still down), the recording goes on in
    the background; once the store is back, it lands, and a wait returns."""
    store = FlakyStore(failures=1000)
    middleware = IdempotencyMiddleware(CountingApp(), store=store, lease=30)
    async with client_for(middleware) as client:
        assert (await client.post("/pay", content=b"{}", headers=KEY)).status_code == 200
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await middleware.finish_recording()
    assert middleware._background  # still trying
    store.failures = 0
    async with asyncio.timeout(30):
        await middleware.finish_recording()
    assert store.recorded.is_set()
