"""The middleware driven as an ASGI server drives it: chunked bodies, streaming, disconnects, concurrency.

httpx's ``ASGITransport`` buffers responses and never disconnects, so these tests call the middleware with
their own ``receive`` and ``send`` and record every message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import IdempotencyMiddleware, MemoryStore, SQLiteStore, State, Store
from idempo._core.fingerprint import principal_digest
from idempo.asgi import Message, Receive, Scope, Send
from tests.support.middleware import (
    ClaimSpy,
    CountingApp,
    FailingStore,
    RoundTripStore,
    client_for,
    drive,
    http_scope,
    problem_of,
    stored_keys,
)

STORE_KEY = f"{principal_digest(b'')}:k1"


async def _problem(result: Any, status: int, slug: str) -> None:
    response = httpx.Response(result.status, headers=result.headers, content=result.body)
    problem_of(response, status, slug)


# -- request bodies -----------------------------------------------------------------------------------------------


async def test_chunked_body_over_max_request_bytes_is_413_without_content_length() -> None:
    app = CountingApp()
    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store=store, max_request_bytes=100)
    result = await drive(middleware, http_scope(), [b"x" * 40, b"x" * 40, b"x" * 21, b"never read"])
    await _problem(result, 413, "body-too-large")
    assert app.calls == 0
    assert stored_keys(store) == set()


async def test_chunked_body_within_max_request_bytes_reaches_the_app_whole() -> None:
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), max_request_bytes=100)
    chunks = [b"a" * 40, b"", b"b" * 40, b"c" * 20]
    first = await drive(middleware, http_scope(), chunks)
    retry = await drive(middleware, http_scope(), [b"".join(chunks)])  # same bytes, other framing: same request
    assert first.status == 200
    assert app.bodies == [b"".join(chunks)]
    assert retry.body == first.body
    assert (b"idempotent-replayed", b"true") in retry.headers


async def test_content_length_over_max_request_bytes_is_413_before_reading_the_body() -> None:
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), max_request_bytes=100)
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body of a request announced as too large must not be read")

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(http_scope(headers=[(b"content-length", b"101")]), receive, send)
    assert sent[0]["status"] == 413
    assert app.calls == 0


async def test_client_leaving_while_sending_its_body_claims_nothing() -> None:
    app = CountingApp()
    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store=store)
    result = await drive(middleware, http_scope(), [b"half of ", b"the body"], disconnect_midway=True)
    assert result.messages == []
    assert app.calls == 0
    assert stored_keys(store) == set()
    retry = await drive(middleware, http_scope(), [b"half of ", b"the body"])
    assert retry.status == 200
    assert app.bodies == [b"half of the body"]


# -- streaming ----------------------------------------------------------------------------------------------------


class StreamingApp:
    """Sends its chunks one by one, each only after the client has received the previous one."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.calls = 0
        self.delivered = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await receive()
        headers = [(b"content-type", b"text/event-stream"), (b"x-stream", b"1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, chunk in enumerate(self.chunks):
            self.delivered.clear()
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(self.chunks) - 1})
            if index < len(self.chunks) - 1:
                # Would hang if the middleware held chunks back until the end of the response.
                await self.delivered.wait()


async def test_response_streams_to_the_first_client_chunk_by_chunk_and_is_recorded() -> None:
    chunks = [b"data: 1\n\n", b"data: 2\n\n", b"", b"data: 3\n\n"]
    app = StreamingApp(chunks)
    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store=store)
    states_at_each_chunk: list[State | None] = []

    async def client_receives(message: Message) -> None:
        if message["type"] == "http.response.body":
            record = await store.get(STORE_KEY)
            states_at_each_chunk.append(None if record is None else record.state)
            app.delivered.set()

    first = await drive(middleware, http_scope(), on_send=client_receives)
    assert first.messages == [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"x-stream", b"1")],
        },
        *({"type": "http.response.body", "body": c, "more_body": i < 3} for i, c in enumerate(chunks)),
    ]
    # The outcome is recorded before the last chunk goes out, so that a retry sent the moment the client has
    # the whole response never finds the key still in progress.
    assert states_at_each_chunk == [State.IN_PROGRESS, State.IN_PROGRESS, State.IN_PROGRESS, State.COMPLETED]

    retry = await drive(middleware, http_scope())
    assert retry.status == 200
    assert retry.headers == [*first.headers, (b"idempotent-replayed", b"true")]
    assert retry.body == b"".join(chunks)
    assert app.calls == 1


# -- the client goes away ----------------------------------------------------------------------------------------


class PatientApp:
    """Starts listening for a disconnect as soon as it has the body, then answers once ``gate`` opens."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.heard_before_last_chunk: list[bool] = []
        self.heard_after: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        message = await receive()
        assert message == {"type": "http.request", "body": b'{"amount": 5}', "more_body": False}

        async def listen() -> Message:
            return await receive()

        listener = asyncio.create_task(listen())
        self.started.set()
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"charged ", "more_body": True})
        self.heard_before_last_chunk.append(listener.done())
        await send({"type": "http.response.body", "body": b"once", "more_body": False})
        self.heard_after.append(await listener)


@pytest.mark.parametrize("store_class", [MemoryStore, RoundTripStore])
async def test_client_disconnect_mid_request_lets_the_app_finish_and_the_retry_replays(
    store_class: type[MemoryStore],
) -> None:
    app = PatientApp()
    store = store_class()
    middleware = IdempotencyMiddleware(app, store=store)
    gone = False
    attempts: list[Message] = []

    async def send_to_departed_client(message: Message) -> None:
        attempts.append(message)
        if gone:
            raise OSError(32, "Broken pipe")

    request = asyncio.create_task(drive(middleware, http_scope(), [b'{"amount": 5}'], on_send=send_to_departed_client))
    await app.started.wait()
    gone = True  # the client hangs up; its receive now answers http.disconnect
    app.gate.set()
    first = await request  # the middleware swallows the broken pipe: nobody to tell

    assert first.messages == []
    assert len(attempts) == 1  # after the first failed send, nothing more was forwarded
    assert app.heard_before_last_chunk == [False]  # the app was never told about the disconnect mid-response
    assert app.heard_after == [{"type": "http.disconnect"}]  # ... only once its response was done
    record = await store.get(STORE_KEY)
    assert record is not None
    assert record.state is State.COMPLETED

    retry = await drive(middleware, http_scope(), [b'{"amount": 5}'])
    assert retry.status == 201
    assert retry.body == b"charged once"
    assert (b"idempotent-replayed", b"true") in retry.headers
    assert app.calls == 1


async def test_client_disconnect_after_the_response_started_still_records_it() -> None:
    app = PatientApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore())
    app.gate.set()
    delivered = 0

    async def hang_up_after_headers(message: Message) -> None:
        nonlocal delivered
        delivered += 1
        if delivered > 1:
            raise OSError(104, "Connection reset by peer")

    first = await drive(middleware, http_scope(), [b'{"amount": 5}'], on_send=hang_up_after_headers)
    assert [m["type"] for m in first.messages] == ["http.response.start"]
    retry = await drive(middleware, http_scope(), [b'{"amount": 5}'])
    assert retry.body == b"charged once"
    assert app.calls == 1


async def test_fail_open_app_hears_the_disconnect_instead_of_hanging() -> None:
    app = PatientApp()
    app.gate.set()
    middleware = IdempotencyMiddleware(app, store=FailingStore(), on_store_error="fail_open")
    async with asyncio.timeout(2):  # a bound on a failure, not a synchronisation
        result = await drive(middleware, http_scope(), [b'{"amount": 5}'])
    assert result.status == 201
    assert result.body == b"charged once"
    assert app.heard_after == [{"type": "http.disconnect"}]


# -- scope extensions ---------------------------------------------------------------------------------------------


async def test_extensions_that_bypass_send_are_hidden_and_the_key_is_still_in_state() -> None:
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore())
    scope = http_scope()
    scope["extensions"] = {"http.response.pathsend": {}, "http.response.zerocopy": {}, "http.response.trailers": {}}
    await drive(middleware, scope)
    seen = app.scopes[0]
    assert seen["extensions"] == {"http.response.trailers": {}}
    assert seen["state"]["idempotency_key"] == "k1"
    assert app.keys == ["k1"]
    assert scope["extensions"] == {
        "http.response.pathsend": {},
        "http.response.zerocopy": {},
        "http.response.trailers": {},
    }


# -- concurrency ----------------------------------------------------------------------------------------------------


async def _wait_until_only_the_app_holds(tasks: set[asyncio.Task[httpx.Response]], app: CountingApp) -> None:
    """Return once every request still pending is one that is inside the app (held by its gate)."""
    while len(pending := {task for task in tasks if not task.done()}) > app.calls:
        app.started.clear()  # no await since the check: an entry into the app cannot be missed
        entered = asyncio.create_task(app.started.wait())
        await asyncio.wait({*pending, entered}, return_when=asyncio.FIRST_COMPLETED)
        entered.cancel()


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "round-trip"])
async def test_fifty_concurrent_identical_requests_run_once(store_kind: str, tmp_path: Path) -> None:
    stores: dict[str, Callable[[], Store]] = {
        "memory": MemoryStore,
        "sqlite": lambda: SQLiteStore(tmp_path / "idempo.db"),
        "round-trip": RoundTripStore,
    }
    store = stores[store_kind]()
    gate = asyncio.Event()
    app = CountingApp(status=201, gate=gate)
    try:
        async with client_for(IdempotencyMiddleware(app, store=store)) as client:

            async def post() -> httpx.Response:
                return await client.post("/orders", content=b'{"amount": 1}', headers={"Idempotency-Key": "k1"})

            tasks = {asyncio.create_task(post()) for _ in range(50)}
            await _wait_until_only_the_app_holds(tasks, app)
            gate.set()
            responses = await asyncio.gather(*tasks)
            retries = await asyncio.gather(*(post() for _ in range(50)))
    finally:
        await store.close()
    assert app.calls == 1
    originals = [r for r in responses if r.status_code == 201]
    conflicts = [r for r in responses if r.status_code != 201]
    assert len(originals) == 1
    assert "idempotent-replayed" not in originals[0].headers
    assert len(conflicts) == 49
    for conflict in conflicts:
        problem_of(conflict, 409, "in-progress")
        assert int(conflict.headers["retry-after"]) >= 1
    for retry in retries:
        assert retry.status_code == 201
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.content == originals[0].content


async def test_requests_with_different_keys_run_concurrently() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        tasks = {
            asyncio.create_task(client.post("/orders", content=str(i).encode(), headers={"Idempotency-Key": f"k{i}"}))
            for i in range(10)
        }
        await _wait_until_only_the_app_holds(tasks, app)
        assert app.calls == 10  # all ten are inside the app at once: no lock across keys
        gate.set()
        responses = await asyncio.gather(*tasks)
    assert sorted(r.json()["body"] for r in responses) == [str(i) for i in range(10)]


async def test_concurrent_requests_that_wait_all_get_the_one_response() -> None:
    gate = asyncio.Event()
    app = CountingApp(status=201, gate=gate)
    store = ClaimSpy()
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=30)
    async with client_for(middleware) as client:
        tasks = [
            asyncio.create_task(client.post("/orders", content=b"{}", headers={"Idempotency-Key": "k1"}))
            for _ in range(20)
        ]
        await store.after(20).wait()  # every request has claimed once: one runs, nineteen wait
        assert not any(task.done() for task in tasks)
        gate.set()
        responses = await asyncio.gather(*tasks)
    assert app.calls == 1
    assert {r.status_code for r in responses} == {201}
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
