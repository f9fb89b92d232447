"""Helpers shared by the middleware tests: a counting ASGI app, store spies and a raw ASGI driver.

This module holds no tests; it is named ``test_middleware_*`` only so that it sits among the files of the
middleware suite. The stores here are real ``MemoryStore`` instances with a thin counting layer, or a
user-written store that fails, never mocks of our own stores.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from idempo import Acquired, Claim, MemoryStore, Record, Store, StoreError
from idempo.asgi import ASGIApp, Message, Receive, Scope, Send
from idempo.stores._forwarding import ForwardingStore

__all__ = [
    "BASE_URL",
    "ClaimSpy",
    "CountingApp",
    "FailingStore",
    "HeldStore",
    "RawResult",
    "RenewSpy",
    "RoundTripStore",
    "client_for",
    "drive",
    "http_scope",
    "problem_of",
    "stored_keys",
]

BASE_URL = "http://test"


def client_for(app: ASGIApp, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An httpx client that calls *app* in process."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL)


def stored_keys(store: MemoryStore) -> set[str]:
    """The keys a ``MemoryStore`` holds records for (one place that knows its private attribute)."""
    return set(store._records)


def problem_of(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """Check that *response* is an RFC 9457 problem document of type *slug*; return its JSON."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    assert document["type"] == f"urn:idempo:problem:{slug}"
    assert document["status"] == status
    assert isinstance(document["title"], str)
    assert document["title"]
    assert isinstance(document["detail"], str)
    assert document["detail"]
    assert int(response.headers["content-length"]) == len(response.content)
    assert "idempotent-replayed" not in response.headers
    return document


@dataclass
class CountingApp:
    """A raw ASGI app that counts its executions, the side effect "exactly once" is about.

    It reads the whole body, records what it saw, optionally waits on ``gate``, then answers ``status`` with
    ``headers`` and ``chunks`` (by default one JSON chunk that names the execution, so that a replay can be
    told from a second run), or raises ``raises``.
    """

    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"application/json"),)
    chunks: Sequence[bytes] | None = None
    raises: BaseException | None = None
    gate: asyncio.Event | None = None
    calls: int = 0
    bodies: list[bytes] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    scopes: list[Scope] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        call = self.calls
        body = b""
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        self.keys.append(scope.get("state", {}).get("idempotency_key"))
        self.scopes.append(scope)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.raises is not None:
            raise self.raises
        chunks = self.chunks
        if chunks is None:
            document = {"call": call, "method": scope["method"], "path": scope["path"], "body": body.decode()}
            chunks = [json.dumps(document).encode()]
        await send({"type": "http.response.start", "status": self.status, "headers": list(self.headers)})
        if not chunks:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        for index, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})


class DelegatingStore(ForwardingStore):
    """A store that hands every operation to ``inner`` (the stores' forwarding base): subclass it and override what
    a test watches."""

    @property
    def inner(self) -> Store:
        """The store every operation goes to."""
        inner: Store = self._inner
        return inner


class HeldStore(MemoryStore):
    """A memory store whose ``claim`` or ``complete`` (*held*) waits for ``gate`` once it is called, before
    (*made*: after) doing what it was asked: a store call under way when its request is cancelled, whose effect did
    not happen, or did and its answer never came. It counts the calls made."""

    def __init__(self, held: str, *, made: bool = False) -> None:
        super().__init__()
        self.held = held
        self.made = made
        self.called = asyncio.Event()
        self.gate = asyncio.Event()
        self.finished = asyncio.Event()  # the held call, made (after the gate opened)
        self.calls: list[str] = []

    async def cut_short(self, call: asyncio.Task[Any]) -> None:
        """Cancel *call* once the store holds its call, see it end cancelled, and let the store go on."""
        async with asyncio.timeout(10):
            await self.called.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        self.gate.set()

    async def _hold(self, name: str) -> None:
        if name == self.held and not self.gate.is_set():
            self.called.set()
            await self.gate.wait()

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self.calls.append("claim")
        if not self.made:
            await self._hold("claim")
        claim = await super().claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        if self.made:
            await self._hold("claim")
        if self.held == "claim":
            self.finished.set()
        return claim

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self.calls.append("complete")
        if not self.made:
            await self._hold("complete")
        done = await super().complete(key, token, payload, ttl=ttl)
        if self.made:
            await self._hold("complete")
        if self.held == "complete":
            self.finished.set()
        return done

    async def release(self, key: str, token: str) -> bool:
        self.calls.append("release")
        return await super().release(key, token)


class ClaimSpy(MemoryStore):
    """A ``MemoryStore`` that counts claims, and sets ``claimed[n]`` once it has seen *n* of them."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.claimed: dict[int, asyncio.Event] = {}

    def after(self, count: int) -> asyncio.Event:
        """An event set once *count* claims have been answered."""
        return self.claimed.setdefault(count, asyncio.Event())

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        result = await super().claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        self.claims += 1
        self.after(self.claims).set()
        return result


class RenewSpy(MemoryStore):
    """A ``MemoryStore`` that counts ``renew`` calls and wakes whoever waits for the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals = 0
        self.renewed = asyncio.Condition()
        self.tokens: list[str] = []

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        result = await super().claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        if isinstance(result, Acquired):
            self.tokens.append(result.token)
        return result

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        owned = await super().renew(key, token, lease=lease)
        async with self.renewed:
            self.renewals += 1
            self.renewed.notify_all()
        return owned

    async def wait_for_renewals(self, count: int) -> None:
        """Return once ``renew`` has been called at least *count* times."""
        async with self.renewed:
            await self.renewed.wait_for(lambda: self.renewals >= count)


class RoundTripStore(MemoryStore):
    """A ``MemoryStore`` whose every operation takes a few turns of the event loop, as a networked store's round
    trip does (``MemoryStore`` itself never suspends, which hides races in the code that awaits it)."""

    turns = 5

    async def _round_trip(self) -> None:
        for _ in range(self.turns):
            await asyncio.sleep(0)

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        await self._round_trip()
        return await super().claim(key, fingerprint, lease=lease, ttl=ttl, token=token)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        await self._round_trip()
        return await super().renew(key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        await self._round_trip()
        return await super().complete(key, token, payload, ttl=ttl)

    async def release(self, key: str, token: str) -> bool:
        await self._round_trip()
        return await super().release(key, token)


class FailingStore:
    """A user-written store whose backend is down: every operation raises ``StoreError``.

    With *fail_on*, only those operations fail; the others work on an in-memory store.
    """

    def __init__(self, fail_on: Iterable[str] | None = None) -> None:
        self.fail_on = frozenset(fail_on) if fail_on is not None else None
        self.inner = MemoryStore()
        self.calls: list[str] = []

    def _check(self, operation: str) -> None:
        self.calls.append(operation)
        if self.fail_on is None or operation in self.fail_on:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as exc:
                msg = f"backend unreachable during {operation}"
                raise StoreError(msg) from exc

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self._check("claim")
        return await self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self._check("renew")
        return await self.inner.renew(key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self._check("complete")
        return await self.inner.complete(key, token, payload, ttl=ttl)

    async def release(self, key: str, token: str) -> bool:
        self._check("release")
        return await self.inner.release(key, token)

    async def get(self, key: str) -> Record | None:
        self._check("get")
        return await self.inner.get(key)

    async def delete(self, key: str) -> bool:
        self._check("delete")
        return await self.inner.delete(key)

    async def purge_expired(self) -> int:
        self._check("purge_expired")
        return await self.inner.purge_expired()

    async def close(self) -> None:
        await self.inner.close()


def http_scope(
    method: str = "POST",
    path: str = "/orders",
    *,
    key: bytes | None = b"k1",
    headers: Sequence[tuple[bytes, bytes]] = (),
    query: bytes = b"",
) -> Scope:
    """An HTTP scope as an ASGI server would build it."""
    raw_headers = [(b"host", b"test"), *headers]
    if key is not None:
        raw_headers.append((b"idempotency-key", key))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


@dataclass
class RawResult:
    """What a raw ASGI exchange sent to the client, message by message."""

    messages: list[Message]

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return starts[0]

    @property
    def status(self) -> int:
        status: int = self.start["status"]
        return status

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(name), bytes(value)) for name, value in self.start.get("headers", [])]

    @property
    def chunks(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def drive(
    app: ASGIApp,
    scope: Scope,
    body_chunks: Sequence[bytes] = (b"",),
    *,
    on_send: Callable[[Message], Awaitable[None]] | None = None,
    disconnect_midway: bool = False,
) -> RawResult:
    """Call *app* as an ASGI server would, delivering *body_chunks* as separate ``http.request`` messages.

    After the body (or, with *disconnect_midway*, after the first chunk), ``receive`` answers
    ``http.disconnect``. *on_send* sees each message the app sends, and may raise (``OSError`` when the client
    is gone), in which case the message is not recorded.
    """
    messages: list[Message] = []
    pending = list(body_chunks)
    if disconnect_midway:
        pending = pending[:1]
        last_more = True
    else:
        last_more = False

    async def receive() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or last_more}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if on_send is not None:
            await on_send(message)
        messages.append(message)

    await app(scope, receive, send)
    return RawResult(messages)
