"""Replays are byte-identical: status, headers and body, whatever the body is, on every built-in store."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from idempo import IdempotencyMiddleware, MemoryStore, SQLiteStore, Store
from idempo.asgi import Message, Receive, Scope, Send
from tests.support.middleware import RoundTripStore, client_for, drive, http_scope

MiB = 1024 * 1024


class Counted:
    """An ASGI app that counts its runs and answers with a fresh Starlette response from *make* each time."""

    def __init__(self, make: Callable[[], Response]) -> None:
        self.make = make
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await self.make()(scope, receive, send)


@pytest.fixture(params=["memory", "sqlite", "round-trip"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backends: dict[str, Callable[[], Store]] = {
        "memory": MemoryStore,
        "sqlite": lambda: SQLiteStore(tmp_path / "replay.db"),
        "round-trip": RoundTripStore,
    }
    backend = backends[request.param]()
    yield backend
    await backend.close()


async def _first_and_replay(app: Counted, store: Store) -> tuple[httpx.Response, httpx.Response]:
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        first = await client.post("/things", content=b"{}", headers={"Idempotency-Key": "replay-1"})
        replay = await client.post("/things", content=b"{}", headers={"Idempotency-Key": "replay-1"})
    assert app.calls == 1
    assert "idempotent-replayed" not in first.headers
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.status_code == first.status_code
    assert replay.headers.raw == [*first.headers.raw, (b"idempotent-replayed", b"true")]
    assert replay.content == first.content
    return first, replay


async def test_json_replay(store: Store) -> None:
    document = {"id": 42, "amount": "10.00", "currency": "EUR", "note": "caf\u00e9 \u2603 \U0001f600", "tags": []}
    app = Counted(lambda: JSONResponse(document, status_code=201, headers={"Location": "/things/42"}))
    _, replay = await _first_and_replay(app, store)
    assert replay.status_code == 201
    assert json.loads(replay.content) == document
    assert replay.headers["location"] == "/things/42"
    assert replay.headers["content-type"] == "application/json"


async def test_binary_replay_with_every_byte_value(store: Store) -> None:
    body = bytes(range(256)) * 4 + bytes(reversed(range(256)))
    app = Counted(lambda: Response(body, media_type="application/octet-stream", headers={"ETag": '"v1"'}))
    _, replay = await _first_and_replay(app, store)
    assert replay.content == body
    assert replay.headers["etag"] == '"v1"'


async def test_empty_204_replay(store: Store) -> None:
    app = Counted(lambda: Response(status_code=204, headers={"X-Deleted": "thing-7"}))
    first, replay = await _first_and_replay(app, store)
    assert first.status_code == replay.status_code == 204
    assert replay.content == b""
    assert replay.headers["x-deleted"] == "thing-7"


async def test_multi_megabyte_replay(store: Store) -> None:
    body = random.Random(3).randbytes(3 * MiB + 17)
    app = Counted(lambda: Response(body, media_type="application/octet-stream"))
    first, replay = await _first_and_replay(app, store)
    assert first.content == body
    assert replay.content == body
    assert replay.headers["content-length"] == str(len(body))


def _chunks() -> Iterator[bytes]:
    rng = random.Random(7)
    yield b'{"rows": ['
    for row in range(5):
        yield json.dumps({"row": row}).encode() + b","
    yield rng.randbytes(MiB)  # a large binary chunk among small ones
    yield b"]}"


def _scope(spec_version: str, key: bytes) -> Scope:
    scope = http_scope(key=key)
    scope["asgi"]["spec_version"] = spec_version
    return scope


# Under ASGI spec 2.3 (what uvicorn reports) Starlette's streaming and file responses listen for a disconnect
# while they send, and stop sending when they hear one.
SPEC_VERSIONS = pytest.mark.parametrize("spec_version", ["2.3", "2.4"])


@SPEC_VERSIONS
async def test_streaming_response_replay(store: Store, spec_version: str) -> None:
    expected_chunks = list(_chunks())
    app = Counted(lambda: StreamingResponse(_chunks(), status_code=202, media_type="application/x-ndjson"))
    middleware = IdempotencyMiddleware(app, store=store)

    first = await drive(middleware, _scope(spec_version, b"stream-1"))
    # The first client gets the chunks as the app streams them, not one buffered body.
    assert [chunk for chunk in first.chunks if chunk] == expected_chunks
    assert [m.get("more_body", False) for m in first.messages[1:]][-1] is False

    replay = await drive(middleware, _scope(spec_version, b"stream-1"))
    assert app.calls == 1
    assert replay.status == first.status == 202
    assert replay.headers == [*first.headers, (b"idempotent-replayed", b"true")]
    assert replay.body == b"".join(expected_chunks)

    async with client_for(middleware) as client:
        via_http = await client.post("/orders", headers={"Idempotency-Key": "stream-1"})
    assert via_http.content == b"".join(expected_chunks)
    assert app.calls == 1


async def test_each_streamed_message_reaches_the_client_unchanged(store: Store) -> None:
    """The first response is forwarded message by message, the very messages the app sent."""
    sent_by_app: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        messages: list[Message] = [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]},
            {"type": "http.response.body", "body": b"one ", "more_body": True},
            {"type": "http.response.body", "body": b"", "more_body": True},
            {"type": "http.response.body", "body": b"two", "more_body": False},
        ]
        for message in messages:
            sent_by_app.append(message)
            await send(message)

    result = await drive(IdempotencyMiddleware(app, store=store), http_scope())
    assert result.messages == sent_by_app
    assert all(got is sent for got, sent in zip(result.messages, sent_by_app, strict=True))


@SPEC_VERSIONS
async def test_file_response_replay(store: Store, spec_version: str, tmp_path: Path) -> None:
    path = tmp_path / "report.bin"
    content = random.Random(11).randbytes(200_000)
    path.write_bytes(content)
    app = Counted(lambda: FileResponse(path, media_type="application/octet-stream", filename="report.bin"))
    middleware = IdempotencyMiddleware(app, store=store)
    scope = _scope(spec_version, b"file-1")
    scope["extensions"] = {"http.response.pathsend": {}}  # hidden from the app: a path we could not record

    first = await drive(middleware, scope)
    assert first.status == 200
    assert first.body == content
    assert all(m["type"] != "http.response.pathsend" for m in first.messages)

    replay = await drive(middleware, _scope(spec_version, b"file-1"))
    assert app.calls == 1
    assert replay.headers == [*first.headers, (b"idempotent-replayed", b"true")]
    assert replay.body == content


async def test_chunks_sent_from_a_reused_buffer_are_recorded_as_they_were_sent(store: Store) -> None:
    """ASGI lets an app reuse its buffer once ``send`` returns; Starlette streams ``memoryview`` chunks."""
    parts = [b"first part|", b"second    |", b"third!"]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        buffer = bytearray(16)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for index, part in enumerate(parts):
            buffer[: len(part)] = part
            chunk = memoryview(buffer)[: len(part)]
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(parts) - 1})

    middleware = IdempotencyMiddleware(app, store=store)
    received: list[bytes] = []

    async def client_copies(message: Message) -> None:
        if message["type"] == "http.response.body":
            received.append(bytes(message["body"]))  # a server writes the bytes out before send returns

    await drive(middleware, http_scope(key=b"buffer-1"), on_send=client_copies)
    assert received == parts
    replay = await drive(middleware, http_scope(key=b"buffer-1"))
    assert replay.body == b"".join(parts)
