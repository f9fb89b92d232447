"""The HTTP contract of SPEC section 3, row by row, through ``IdempotencyMiddleware`` in process.

Every test counts the executions of the app (its side effect) to prove "exactly once", and every wait is on an
event, never a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import IdempotencyMiddleware, MemoryStore, SQLiteStore, State, Store
from idempo._core.fingerprint import principal_digest
from idempo.asgi import Scope
from tests.support.middleware import (
    ClaimSpy,
    CountingApp,
    FailingStore,
    RenewSpy,
    client_for,
    drive,
    http_scope,
    problem_of,
    stored_keys,
)

KEY = "8e03978e-40d5-43e8-bc93-6894a57f9324"


def keyed(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


def replayed(response: httpx.Response) -> bool:
    return bool(response.headers.get("idempotent-replayed") == "true")


# -- malformed and missing keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_key",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"   ", id="blank"),
        pytest.param(b"a" * 256, id="256-chars"),
        pytest.param(b'"' + b"a" * 256 + b'"', id="256-chars-quoted"),
        pytest.param(b"has space", id="space"),
        pytest.param(b"tab\there", id="tab"),
        pytest.param("caf\u00e9".encode(), id="non-ascii-utf8"),
        pytest.param(b"caf\xe9", id="non-ascii-latin1"),
        pytest.param(b"nul\x00byte", id="control"),
        pytest.param(b'"abc', id="unterminated-quote"),
        pytest.param(b'"', id="lone-quote"),
        pytest.param(b'"a"b"', id="quote-inside"),
        pytest.param(b'"a\\x"', id="bad-escape"),
        pytest.param(b'""', id="empty-quoted"),
        pytest.param(b'"a b"', id="space-in-quoted"),
    ],
)
async def test_malformed_key_is_400_and_the_app_is_not_called(raw_key: bytes) -> None:
    app = CountingApp()
    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        response = await client.post("/orders", content=b"{}", headers={b"Idempotency-Key": raw_key})
    problem_of(response, 400, "invalid-key")
    assert app.calls == 0
    assert stored_keys(store) == set()


async def test_key_of_255_visible_ascii_characters_is_accepted() -> None:
    app = CountingApp()
    visible = bytes(range(0x21, 0x7F)).decode()  # every visible ASCII character, quotes and backslash included
    key = (visible * 3)[:255]
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/orders", content=b"{}", headers={"Idempotency-Key": key})
        second = await client.post("/orders", content=b"{}", headers={"Idempotency-Key": key})
    assert first.status_code == 200
    assert replayed(second)
    assert app.calls == 1
    assert app.keys == [key]


async def test_sf_string_key_is_the_same_record_as_the_bare_key() -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        quoted = await client.post("/orders", content=b"{}", headers={"Idempotency-Key": '"abc"'})
        bare = await client.post("/orders", content=b"{}", headers={"Idempotency-Key": "abc"})
        escaped = await client.post("/orders", content=b"{}", headers={"Idempotency-Key": r'"a\"b\\c"'})
        unescaped = await client.post("/orders", content=b"{}", headers={"Idempotency-Key": r'a"b\c'})
    assert quoted.status_code == 200
    assert not replayed(quoted)
    assert replayed(bare)
    assert bare.content == quoted.content
    assert replayed(unescaped)
    assert unescaped.content == escaped.content
    assert app.calls == 2
    assert app.keys == ["abc", r'a"b\c']


@pytest.mark.parametrize("values", [("one", "two"), ("same", "same")])
async def test_two_key_headers_are_400(values: tuple[str, str]) -> None:
    app = CountingApp()
    headers = [("Idempotency-Key", values[0]), ("Idempotency-Key", values[1])]
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        response = await client.post("/orders", content=b"{}", headers=headers)
    problem_of(response, 400, "invalid-key")
    assert app.calls == 0


async def test_other_repeated_headers_leave_one_key_valid() -> None:
    # Headers whose names repeat (two Accept, two X-Trace) beside one key: the request runs once and replays.
    app = CountingApp()
    headers = [("Accept", "application/json"), ("Accept", "text/plain"), ("X-Trace", "a"), ("X-Trace", "b")]
    headers.append(("Idempotency-Key", KEY))
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/orders", content=b"{}", headers=headers)
        second = await client.post("/orders", content=b"{}", headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_require_key_true_answers_400_to_unkeyed_mutations_only() -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore(), require_key=True)) as client:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            problem_of(await client.request(method, "/orders", content=b"{}"), 400, "missing-key")
        assert app.calls == 0
        assert (await client.get("/orders")).status_code == 200
        assert (await client.post("/orders", content=b"{}", headers=keyed())).status_code == 200
    assert app.calls == 2


async def test_require_key_predicate_applies_to_its_paths_only() -> None:
    app = CountingApp()
    seen: list[str] = []

    def required(path: str) -> bool:
        seen.append(path)
        return path.startswith("/payments")

    middleware = IdempotencyMiddleware(app, store=MemoryStore(), require_key=required)
    async with client_for(middleware) as client:
        problem_of(await client.post("/payments/charge", content=b"{}"), 400, "missing-key")
        assert app.calls == 0
        passthrough = await client.post("/profile", content=b"{}")
        again = await client.post("/profile", content=b"{}")
        keyed_payment = await client.post("/payments/charge", content=b"{}", headers=keyed())
    assert passthrough.status_code == again.status_code == keyed_payment.status_code == 200
    assert not replayed(again)
    assert app.calls == 3
    assert seen == ["/payments/charge", "/profile", "/profile"]


# -- first request, replay ----------------------------------------------------------------------------------


async def test_first_request_runs_and_its_response_is_unchanged() -> None:
    headers = ((b"content-type", b"application/json"), (b"x-request-id", b"r-1"), (b"set-cookie", b"s=1; Path=/"))
    app = CountingApp(status=201, headers=headers)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        response = await client.post("/orders", content=b'{"amount": 10}', headers=keyed())
    assert response.status_code == 201
    assert response.headers.raw == [(b"content-type", b"application/json"), (b"x-request-id", b"r-1"), headers[2]]
    assert response.json() == {"call": 1, "method": "POST", "path": "/orders", "body": '{"amount": 10}'}
    assert app.calls == 1
    assert app.bodies == [b'{"amount": 10}']


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_every_protected_method_is_replayed(method: str) -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.request(method, "/orders/1", content=b"{}", headers=keyed())
        retry = await client.request(method, "/orders/1", content=b"{}", headers=keyed())
    assert replayed(retry)
    assert retry.content == first.content
    assert first.json()["method"] == method
    assert app.calls == 1


async def test_replay_has_same_status_headers_and_body_and_does_not_run_the_app() -> None:
    headers = (
        (b"content-type", b"application/json; charset=utf-8"),
        (b"location", b"/orders/42"),
        (b"x-custom", b"first"),
        (b"x-custom", b"second"),
        (b"cache-control", b"no-store"),
    )
    app = CountingApp(status=201, headers=headers)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/orders", content=b'{"amount": 10}', headers=keyed())
        retries = [await client.post("/orders", content=b'{"amount": 10}', headers=keyed()) for _ in range(3)]
    assert app.calls == 1
    assert not replayed(first)
    for retry in retries:
        assert retry.status_code == 201
        assert retry.content == first.content
        assert retry.headers.raw == [*headers, (b"idempotent-replayed", b"true")]
        assert retry.headers.get_list("x-custom") == ["first", "second"]
        assert retry.headers["location"] == "/orders/42"


async def test_hop_by_hop_headers_and_set_cookie_are_not_replayed() -> None:
    headers = (
        (b"content-type", b"text/plain"),
        (b"connection", b"keep-alive, X-Conn-Scoped"),
        (b"keep-alive", b"timeout=5"),
        (b"x-conn-scoped", b"dropped as the Connection header names it"),
        (b"proxy-authenticate", b"Basic"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"h2c"),
        (b"te", b"trailers"),
        (b"set-cookie", b"session=abc; HttpOnly"),
        (b"Set-Cookie", b"other=def"),
        (b"x-kept", b"yes"),
    )
    app = CountingApp(headers=headers, chunks=[b"done"])
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/orders", headers=keyed())
        retry = await client.post("/orders", headers=keyed())
    assert first.headers.raw == list(headers)  # the first response is the app's, untouched
    assert retry.headers.raw == [
        (b"content-type", b"text/plain"),
        (b"x-kept", b"yes"),
        (b"idempotent-replayed", b"true"),
    ]
    assert retry.content == b"done"
    assert app.calls == 1


async def test_set_cookie_is_replayed_when_allowed() -> None:
    headers = ((b"content-type", b"text/plain"), (b"set-cookie", b"session=abc; HttpOnly"), (b"connection", b"close"))
    app = CountingApp(headers=headers, chunks=[b"done"])
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), replay_set_cookie=True)
    async with client_for(middleware) as client:
        await client.post("/orders", headers=keyed())
        retry = await client.post("/orders", headers=keyed())
    assert retry.headers.raw == [*headers[:2], (b"idempotent-replayed", b"true")]
    assert app.calls == 1


# -- key reuse ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        pytest.param("POST", "/orders", b'{"amount": 11}', id="other-body"),
        pytest.param("POST", "/orders", b"", id="no-body"),
        pytest.param("POST", "/refunds", b'{"amount": 10}', id="other-path"),
        pytest.param("PUT", "/orders", b'{"amount": 10}', id="other-method"),
        pytest.param("POST", "/orders?currency=eur", b'{"amount": 10}', id="other-query"),
        pytest.param("POST", "/orders?", b'{"amount": 10}x', id="appended-byte"),
    ],
)
async def test_key_reused_with_another_request_is_422_and_nothing_runs(method: str, url: str, body: bytes) -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/orders", content=b'{"amount": 10}', headers=keyed())
        reused = await client.request(method, url, content=body, headers=keyed())
        original = await client.post("/orders", content=b'{"amount": 10}', headers=keyed())
    problem_of(reused, 422, "key-reused")
    assert b"amount" not in reused.content
    assert app.calls == 1
    assert replayed(original)
    assert original.content == first.content


async def test_key_reused_while_in_progress_with_another_request_is_422() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = asyncio.create_task(client.post("/orders", content=b"a", headers=keyed()))
        await app.started.wait()
        problem_of(await client.post("/orders", content=b"b", headers=keyed()), 422, "key-reused")
        gate.set()
        assert (await first).status_code == 200
    assert app.calls == 1


# -- in progress ----------------------------------------------------------------------------------------------


async def test_same_key_while_the_first_runs_is_409_with_retry_after() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore(), retry_after=5)) as client:
        first = asyncio.create_task(client.post("/orders", content=b"{}", headers=keyed()))
        await app.started.wait()
        conflicts = [await client.post("/orders", content=b"{}", headers=keyed()) for _ in range(3)]
        gate.set()
        done = await first
        retry = await client.post("/orders", content=b"{}", headers=keyed())
    for conflict in conflicts:
        problem_of(conflict, 409, "in-progress")
        # min(retry_after=5, the 30 s lease left), whole seconds
        assert conflict.headers["retry-after"] == "5"
    assert done.status_code == 200
    assert not replayed(done)
    assert replayed(retry)
    assert retry.content == done.content
    assert app.calls == 1


async def test_retry_after_of_409_is_at_most_the_lease_left() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore(), retry_after=60, lease=2)) as client:
        first = asyncio.create_task(client.post("/orders", headers=keyed()))
        await app.started.wait()
        conflict = await client.post("/orders", headers=keyed())
        gate.set()
        await first
    problem_of(conflict, 409, "in-progress")
    assert conflict.headers["retry-after"] == "2"


async def test_wait_on_conflict_replays_the_first_response() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate, status=201)
    store = ClaimSpy()
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=10)
    async with client_for(middleware) as client:
        first = asyncio.create_task(client.post("/orders", content=b"{}", headers=keyed()))
        await app.started.wait()
        second = asyncio.create_task(client.post("/orders", content=b"{}", headers=keyed()))
        await store.after(2).wait()  # the second found the key in progress and is now waiting
        assert not second.done()
        gate.set()
        original, waited = await asyncio.gather(first, second)
    assert original.status_code == waited.status_code == 201
    assert replayed(waited)
    assert waited.content == original.content
    assert app.calls == 1


async def test_wait_on_conflict_gives_up_with_409_after_wait_timeout() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), on_conflict="wait", wait_timeout=0.05)
    async with client_for(middleware) as client:
        first = asyncio.create_task(client.post("/orders", headers=keyed()))
        await app.started.wait()
        waited = await client.post("/orders", headers=keyed())
        assert not first.done()
        gate.set()
        assert (await first).status_code == 200
    problem_of(waited, 409, "in-progress")
    assert "retry-after" in waited.headers
    assert app.calls == 1


async def test_wait_on_conflict_runs_the_request_if_the_first_failed() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate, status=503)
    store = ClaimSpy()
    middleware = IdempotencyMiddleware(app, store=store, on_conflict="wait", wait_timeout=10)
    async with client_for(middleware) as client:
        first = asyncio.create_task(client.post("/orders", headers=keyed()))
        await app.started.wait()
        second = asyncio.create_task(client.post("/orders", headers=keyed()))
        await store.after(2).wait()
        gate.set()
        failed, rerun = await asyncio.gather(first, second)
    assert failed.status_code == rerun.status_code == 503
    assert not replayed(rerun)
    assert app.calls == 2  # the first did not happen (503), so the waiting retry ran it


# -- which outcomes are stored ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409, 425, 429])
async def test_statuses_that_did_not_happen_are_released_and_run_again(status: int) -> None:
    app = CountingApp(status=status)
    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        first = await client.post("/orders", content=b"{}", headers=keyed())
        assert stored_keys(store) == set()  # released: nothing stored
        retry = await client.post("/orders", content=b"{}", headers=keyed())
    assert first.status_code == retry.status_code == status
    assert not replayed(retry)
    assert first.json()["call"] == 1
    assert retry.json()["call"] == 2
    assert app.calls == 2


async def test_app_that_raises_stores_nothing_and_the_retry_runs_again() -> None:
    app = CountingApp(raises=RuntimeError("card network down"))
    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        with pytest.raises(RuntimeError, match="card network down"):
            await client.post("/orders", content=b"{}", headers=keyed())
        assert stored_keys(store) == set()
        app.raises = None
        retry = await client.post("/orders", content=b"{}", headers=keyed())
    assert retry.status_code == 200
    assert not replayed(retry)
    assert app.calls == 2


async def test_app_that_raises_after_starting_its_response_is_released() -> None:
    class HalfApp(CountingApp):
        async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
            self.calls += 1
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("died mid-response")

    app = HalfApp()
    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store), raise_app_exceptions=False) as client:
        await client.post("/orders", headers=keyed())
        await client.post("/orders", headers=keyed())
    assert stored_keys(store) == set()
    assert app.calls == 2


async def test_app_that_returns_without_finishing_its_response_is_released() -> None:
    class Truncating(CountingApp):
        async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
            self.calls += 1
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})

    app = Truncating()
    store = MemoryStore()
    middleware = IdempotencyMiddleware(app, store=store)
    # httpx's ASGITransport insists on a finished response, so look at the store through the middleware
    # directly with a bare receive/send.
    for _ in range(2):
        result = await drive(middleware, http_scope())
        assert result.chunks == [b"partial"]
    assert stored_keys(store) == set()
    assert app.calls == 2


async def test_store_server_errors_keeps_and_replays_5xx() -> None:
    app = CountingApp(status=500)
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), store_server_errors=True)
    async with client_for(middleware) as client:
        first = await client.post("/orders", content=b"{}", headers=keyed())
        retry = await client.post("/orders", content=b"{}", headers=keyed())
    assert first.status_code == retry.status_code == 500
    assert replayed(retry)
    assert retry.content == first.content
    assert app.calls == 1


async def test_store_server_errors_still_releases_an_exception() -> None:
    app = CountingApp(raises=RuntimeError("boom"))
    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store, store_server_errors=True)) as client:
        with pytest.raises(RuntimeError):
            await client.post("/orders", headers=keyed())
    assert stored_keys(store) == set()


@pytest.mark.parametrize("status", [200, 201, 202, 204, 301, 302, 303, 400, 401, 403, 404, 410, 422])
async def test_other_statuses_are_stored_and_replayed(status: int) -> None:
    headers = ((b"content-type", b"application/json"), (b"location", b"/orders/7"))
    app = CountingApp(status=status, headers=headers, chunks=[] if status == 204 else None)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        first = await client.post("/orders", content=b"{}", headers=keyed())
        retry = await client.post("/orders", content=b"{}", headers=keyed())
    assert first.status_code == retry.status_code == status
    assert replayed(retry)
    assert retry.content == first.content
    assert retry.headers["location"] == "/orders/7"
    assert app.calls == 1


# -- the store fails ------------------------------------------------------------------------------------------


async def test_failing_store_is_a_store() -> None:
    assert isinstance(FailingStore(), Store)


async def test_unreachable_store_is_503_with_retry_after_and_the_app_is_not_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = CountingApp()
    store = FailingStore()
    async with client_for(IdempotencyMiddleware(app, store=store, retry_after=7)) as client:
        responses = [await client.post("/orders", headers=keyed()) for _ in range(2)]
    for response in responses:
        problem_of(response, 503, "store-unavailable")
        assert response.headers["retry-after"] == "7"
        assert "refused" not in response.text  # the backend's error is logged, not shown
    assert app.calls == 0
    assert store.calls == ["claim", "claim"]
    assert any(r.levelno == logging.ERROR and "backend unreachable" in r.getMessage() for r in caplog.records)


async def test_fail_open_runs_the_app_unprotected_and_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    app = CountingApp(status=201)
    middleware = IdempotencyMiddleware(app, store=FailingStore(), on_store_error="fail_open")
    with caplog.at_level(logging.WARNING, logger="idempo"):
        async with client_for(middleware) as client:
            first = await client.post("/orders", content=b"{}", headers=keyed())
            second = await client.post("/orders", content=b"{}", headers=keyed())
    assert first.status_code == second.status_code == 201
    assert not replayed(second)
    assert app.calls == 2  # unprotected: nothing could be recorded
    assert app.keys == [KEY, KEY]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unprotected" in r.getMessage()]
    assert len(warnings) == 2
    assert "unprotected" in warnings[0].getMessage()


async def test_store_failing_to_record_the_outcome_still_answers_the_client(caplog: pytest.LogCaptureFixture) -> None:
    app = CountingApp(status=201)
    store = FailingStore(fail_on={"complete"})
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        response = await client.post("/orders", content=b"{}", headers=keyed())
    assert response.status_code == 201
    assert response.json()["call"] == 1
    assert store.calls == ["claim", "complete"]
    assert any("could not record" in r.getMessage() for r in caplog.records)


# -- size limits --------------------------------------------------------------------------------------------


async def test_response_over_max_response_bytes_reaches_the_client_and_a_retry_gets_410() -> None:
    body = bytes(range(256)) * 8  # 2048 bytes
    app = CountingApp(status=201, chunks=[body[:1000], body[1000:]])
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), max_response_bytes=1024)
    async with client_for(middleware) as client:
        first = await client.post("/exports", content=b"{}", headers=keyed())
        retries = [await client.post("/exports", content=b"{}", headers=keyed()) for _ in range(2)]
    assert first.status_code == 201
    assert first.content == body
    for retry in retries:
        document = problem_of(retry, 410, "response-not-stored")
        assert document["original_status"] == 201
    assert app.calls == 1


async def test_response_of_exactly_max_response_bytes_is_replayed() -> None:
    body = b"x" * 1024
    app = CountingApp(chunks=[body[:10], body[10:]])
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore(), max_response_bytes=1024)) as client:
        await client.post("/exports", headers=keyed())
        retry = await client.post("/exports", headers=keyed())
    assert replayed(retry)
    assert retry.content == body
    assert app.calls == 1


async def test_request_body_over_max_request_bytes_is_413_with_content_length() -> None:
    app = CountingApp()
    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store, max_request_bytes=100)) as client:
        too_big = await client.post("/orders", content=b"x" * 101, headers=keyed())
        just_right = await client.post("/orders", content=b"x" * 100, headers=keyed("other"))
        unkeyed = await client.post("/orders", content=b"x" * 101)
    problem = problem_of(too_big, 413, "body-too-large")
    assert problem["detail"] == "the request body is 101 bytes; at most 100 are accepted"  # from Content-Length
    assert just_right.status_code == 200
    assert unkeyed.status_code == 200  # without a key nothing is buffered, so no limit applies
    assert app.calls == 2
    assert stored_keys(store) == {f"{principal_digest(b'')}:other"}


# -- principals, fingerprints ---------------------------------------------------------------------------------


async def test_principals_never_see_each_others_responses() -> None:
    app = CountingApp()
    alice = {"Authorization": "Bearer alice-token"}
    bob = {"Authorization": "Bearer bob-token"}
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        a1 = await client.post("/orders", content=b"alice-secret", headers=keyed(**alice))
        b1 = await client.post("/orders", content=b"bob-order", headers=keyed(**bob))
        anonymous = await client.post("/orders", content=b"anon", headers=keyed())
        a2 = await client.post("/orders", content=b"alice-secret", headers=keyed(**alice))
        b2 = await client.post("/orders", content=b"bob-order", headers=keyed(**bob))
        b_reuse = await client.post("/orders", content=b"alice-secret!", headers=keyed(**bob))
    assert not replayed(b1)  # bob's request with alice's key is not a mismatch, not a replay: it runs
    assert not replayed(anonymous)
    assert a1.json()["body"] == "alice-secret"
    assert b1.json()["body"] == "bob-order"
    assert anonymous.json()["body"] == "anon"
    assert replayed(a2)
    assert a2.content == a1.content
    assert replayed(b2)
    assert b2.content == b1.content
    assert app.calls == 3
    # Bob reusing his key is a 422 that reveals nothing of Alice's request, token or record.
    document = problem_of(b_reuse, 422, "key-reused")
    text = b_reuse.text
    for secret in ("alice", principal_digest("Bearer alice-token"), "call"):
        assert secret not in text
    assert set(document) == {"type", "title", "status", "detail"}


async def test_another_principal_is_not_told_that_a_key_is_in_use() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        alice = asyncio.create_task(client.post("/orders", content=b"a", headers=keyed(Authorization="alice")))
        await app.started.wait()
        app.started.clear()
        bob = asyncio.create_task(client.post("/orders", content=b"b", headers=keyed(Authorization="bob")))
        await app.started.wait()  # bob's request runs while alice's is in progress: no 409, no 422
        assert app.calls == 2
        gate.set()
        responses = await asyncio.gather(alice, bob)
    assert [r.json()["body"] for r in responses] == ["a", "b"]


async def test_custom_principal_callable_namespaces_records() -> None:
    app = CountingApp()
    seen: list[Scope] = []

    def tenant(scope: Scope) -> str:
        seen.append(scope)
        tenant: bytes = dict(scope["headers"]).get(b"x-tenant", b"")
        return tenant.decode()

    store = MemoryStore()
    async with client_for(IdempotencyMiddleware(app, store=store, principal=tenant)) as client:
        t1 = await client.post("/orders", headers=keyed(**{"X-Tenant": "t1", "Authorization": "a"}))
        t2 = await client.post("/orders", headers=keyed(**{"X-Tenant": "t2", "Authorization": "a"}))
        t1_again = await client.post("/orders", headers=keyed(**{"X-Tenant": "t1", "Authorization": "b"}))
    assert not replayed(t2)
    assert replayed(t1_again)  # same tenant, whatever the Authorization header says
    assert t1_again.content == t1.content
    assert app.calls == 2
    assert len(seen) == 3
    assert stored_keys(store) == {f"{principal_digest('t1')}:{KEY}", f"{principal_digest('t2')}:{KEY}"}


async def test_canonical_json_makes_reordered_keys_the_same_request() -> None:
    first_body = b'{"amount": 10, "currency": "eur", "meta": {"a": 1, "b": [1, 2]}}'
    reordered = b'{"meta":{"b":[1,2],"a":1},\n "currency":"eur","amount":10}'
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore(), canonical_json=True)) as client:
        first = await client.post("/orders", content=first_body, headers=keyed())
        retry = await client.post("/orders", content=reordered, headers=keyed())
        changed = await client.post("/orders", content=b'{"amount": 11, "currency": "eur"}', headers=keyed())
    assert replayed(retry)
    assert retry.content == first.content
    problem_of(changed, 422, "key-reused")
    assert app.calls == 1
    assert app.bodies == [first_body]  # the app gets the body as sent, not the canonical form

    plain = CountingApp()
    async with client_for(IdempotencyMiddleware(plain, store=MemoryStore())) as client:
        await client.post("/orders", content=first_body, headers=keyed())
        problem_of(await client.post("/orders", content=reordered, headers=keyed()), 422, "key-reused")


async def test_custom_fingerprint_callable_is_used() -> None:
    calls: list[tuple[str, bytes]] = []

    def by_path(scope: Scope, body: bytes) -> str:
        calls.append((scope["path"], body))
        return str(scope["path"])

    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore(), fingerprint=by_path)) as client:
        first = await client.post("/orders", content=b"one", headers=keyed())
        other_body = await client.post("/orders", content=b"two", headers=keyed())
        other_path = await client.post("/refunds", content=b"one", headers=keyed())
    assert replayed(other_body)  # the body does not count for this fingerprint
    assert other_body.content == first.content
    problem_of(other_path, 422, "key-reused")
    assert calls == [("/orders", b"one"), ("/orders", b"two"), ("/refunds", b"one")]
    assert app.calls == 1


# -- store argument --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory-url", "sqlite-url", "memory-object", "sqlite-object"])
async def test_store_may_be_a_url_or_a_store(kind: str, tmp_path: Path) -> None:
    stores: dict[str, str | Store] = {
        "memory-url": "memory://",
        "sqlite-url": f"sqlite:///{tmp_path}/x.db",
        "memory-object": MemoryStore(),
        "sqlite-object": SQLiteStore(tmp_path / "y.db"),
    }
    store = stores[kind]
    app = CountingApp(status=201)
    middleware = IdempotencyMiddleware(app, store=store)
    try:
        assert isinstance(middleware.store, Store)
        if not isinstance(store, str):
            assert middleware.store is store
        async with client_for(middleware) as client:
            first = await client.post("/orders", content=b"{}", headers=keyed())
            retry = await client.post("/orders", content=b"{}", headers=keyed())
            mismatch = await client.post("/orders", content=b"[]", headers=keyed())
        assert first.status_code == retry.status_code == 201
        assert replayed(retry)
        assert retry.content == first.content
        problem_of(mismatch, 422, "key-reused")
        assert app.calls == 1
        record = await middleware.store.get(f"{principal_digest(b'')}:{KEY}")
        assert record is not None
        assert record.state is State.COMPLETED
    finally:
        await middleware.store.close()
    if kind == "sqlite-url":
        assert (tmp_path / "x.db").exists()


# -- passthrough ----------------------------------------------------------------------------------------------


class Recorder:
    """A raw app that records exactly what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[Scope, Any, Any]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": str(len(self.calls)).encode()})


@pytest.mark.parametrize(
    ("method", "key"),
    [
        pytest.param("GET", b"k", id="GET-keyed"),
        pytest.param("HEAD", b"k", id="HEAD-keyed"),
        pytest.param("OPTIONS", b"k", id="OPTIONS-keyed"),
        pytest.param("GET", b"not a valid key", id="GET-malformed-key"),
        pytest.param("POST", None, id="POST-unkeyed"),
        pytest.param("DELETE", None, id="DELETE-unkeyed"),
    ],
)
async def test_passthrough_requests_reach_the_app_untouched(method: str, key: bytes | None) -> None:
    app = Recorder()
    store = FailingStore()  # any use of the store would fail the request
    middleware = IdempotencyMiddleware(app, store=store, require_key=False)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    for _ in range(2):
        scope = http_scope(method, key=key)
        original = dict(scope)
        await middleware(scope, receive, send)
        assert app.calls[-1] == (scope, receive, send)  # the very scope, receive and send of the server
        assert app.calls[-1][0] is scope
        assert {name: value for name, value in scope.items() if name != "state"} == original  # nothing changed...
        assert scope["state"] == {"idempotency_key": None}  # ...but the key, readable as None
    assert len(app.calls) == 2
    assert [m.get("status", m.get("body")) for m in sent] == [200, b"1", 200, b"2"]  # ran twice, no replay
    assert store.calls == []


async def test_methods_option_selects_the_protected_methods() -> None:
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), methods=["post"], header="X-Request-Key")
    async with client_for(middleware) as client:
        posts = [await client.post("/orders", headers={"X-Request-Key": "k"}) for _ in range(2)]
        puts = [await client.put("/orders", headers={"X-Request-Key": "k"}) for _ in range(2)]
        other_header = await client.post("/orders", headers=keyed())
    assert replayed(posts[1])
    assert not any(replayed(put) for put in puts)
    assert not replayed(other_header)
    assert app.calls == 4


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    app = Recorder()
    middleware = IdempotencyMiddleware(app, store=FailingStore())

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        raise AssertionError(message)

    for scope in ({"type": "lifespan", "asgi": {"version": "3.0"}}, {"type": "websocket", "headers": []}):
        await middleware(scope, receive, send)
        assert app.calls[-1][0] == scope
    assert app.calls[1][1:] == (receive, send)  # a websocket's receive and send are the server's
    # The lifespan's send checks the store at start-up; its receive waits, at shutdown, for what is being recorded.
    assert app.calls[0][1] is not receive
    assert await app.calls[0][1]() == {"type": "lifespan.startup"}
    lifespan = IdempotencyMiddleware(app, store=FailingStore(), startup_check="off")
    await lifespan({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert app.calls[-1][2] is send  # with the check off, untouched


# -- the key in the scope ----------------------------------------------------------------------------------------


async def test_key_is_in_scope_state_and_existing_state_is_kept() -> None:
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore())
    scope = http_scope(key=b'"quoted-key"')
    scope["state"] = {"db": "connection"}
    await drive(middleware, scope)
    assert app.scopes[0]["state"] == {"db": "connection", "idempotency_key": "quoted-key"}
    await drive(middleware, http_scope(key=b"bare"))
    assert app.keys == ["quoted-key", "bare"]


# -- problem documents --------------------------------------------------------------------------------------------


async def test_problem_base_uri_is_configurable() -> None:
    middleware = IdempotencyMiddleware(CountingApp(), store=MemoryStore(), problem_base_uri="https://errors.test/")
    async with client_for(middleware) as client:
        response = await client.post("/orders", headers={"Idempotency-Key": ""})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "https://errors.test/invalid-key"


# -- lease renewal ------------------------------------------------------------------------------------------------


async def test_lease_is_renewed_while_the_app_runs_so_a_retry_is_409_not_a_takeover() -> None:
    gate = asyncio.Event()
    app = CountingApp(gate=gate)
    store = RenewSpy()
    lease = 0.3
    middleware = IdempotencyMiddleware(app, store=store, lease=lease)
    async with client_for(middleware) as client:
        first = asyncio.create_task(client.post("/orders", headers=keyed()))
        await app.started.wait()
        record = await store.get(f"{principal_digest(b'')}:{KEY}")
        assert record is not None
        # Wait (on renew calls, not on the clock) until the first lease would have run out without them.
        renewals = 2
        async with asyncio.timeout(5):  # a bound on a failure (no renewals at all), not a synchronisation
            while True:
                await store.wait_for_renewals(renewals)
                if time.time() > record.created_at + lease + 0.05:
                    break
                renewals += 1
        during = await client.post("/orders", headers=keyed())
        gate.set()
        done = await first
    problem_of(during, 409, "in-progress")
    assert done.status_code == 200
    assert app.calls == 1
    assert len(store.tokens) == 1  # nobody took the key over
    assert store.renewals >= 2
    renewals_at_end = store.renewals
    # Nothing to wait for here but time: two renewal periods pass without a renewal once the response is done.
    await asyncio.sleep(2 * lease / 3 + 0.05)
    assert store.renewals == renewals_at_end


# -- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 0},
        {"lease": -1},
        {"on_conflict": "queue"},
        {"on_store_error": "ignore"},
        {"max_request_bytes": -1},
        {"retry_after": -1},
    ],
)
def test_invalid_options_are_rejected_at_start_up(options: dict[str, Any]) -> None:
    from idempo import ConfigurationError

    with pytest.raises(ConfigurationError):
        IdempotencyMiddleware(CountingApp(), store=MemoryStore(), **options)
