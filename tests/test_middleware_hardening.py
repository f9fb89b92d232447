"""The middleware under hostile input and unlucky stores: who a caller is (no one else's response, the same
namespace across a token refresh), what counts as the same request, full stores, responses a server cannot send,
corrupt records, claims whose answer never came, a bad store URL, and canonical JSON that would stall the loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from idempo import Claim, ConfigurationError, IdempotencyMiddleware, MemoryStore, StoreError, StoreFullError
from idempo._core.fingerprint import CANONICAL_JSON_MAX_BYTES
from tests.support.middleware import BASE_URL, CountingApp, DelegatingStore, client_for, problem_of

KEY = "hardening-1"


def keyed(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


# -- who is asking -------------------------------------------------------------------------------------------------


class TokenBackend(AuthenticationBackend):
    """Bearer tokens of the form ``<user>.<version>``: a user keeps their identity when their token is refreshed
    (a new version), as with OAuth access tokens."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None
        user, _, _ = header.removeprefix("Bearer ").partition(".")
        return AuthCredentials(["authenticated"]), SimpleUser(user)


class Charges:
    """A Starlette app with real authentication in front of idempo (the middleware order the docs give)."""

    def __init__(self, store: MemoryStore, *, authenticated: bool = True) -> None:
        self.calls = 0
        middleware = [Middleware(AuthenticationMiddleware, backend=TokenBackend())] if authenticated else []
        middleware.append(Middleware(IdempotencyMiddleware, store=store))
        self.app = Starlette(routes=[Route("/charges", self.charge, methods=["POST"])], middleware=middleware)

    async def charge(self, request: Request) -> JSONResponse:
        self.calls += 1
        user = request.user.display_name if request.user.is_authenticated else None
        return JSONResponse({"charge": self.calls, "user": user}, headers={"x-secret": f"token-of-{user}"})


async def test_two_users_with_the_same_key_never_see_each_others_response() -> None:
    charges = Charges(MemoryStore())
    async with client_for(charges.app) as client:
        alice = await client.post("/charges", json={"amount": 5}, headers=keyed(Authorization="Bearer alice.1"))
        bob = await client.post("/charges", json={"amount": 5}, headers=keyed(Authorization="Bearer bob.1"))
    assert alice.json()["user"] == "alice"
    assert bob.json()["user"] == "bob"
    assert "idempotent-replayed" not in bob.headers
    assert bob.headers["x-secret"] == "token-of-bob"
    assert charges.calls == 2


async def test_a_retry_with_a_refreshed_token_is_still_a_retry() -> None:
    """The authenticated user is the principal, not the token: a refreshed access token keeps the namespace."""
    charges = Charges(MemoryStore())
    async with client_for(charges.app) as client:
        first = await client.post("/charges", json={"amount": 5}, headers=keyed(Authorization="Bearer alice.1"))
        retry = await client.post("/charges", json={"amount": 5}, headers=keyed(Authorization="Bearer alice.2"))
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert charges.calls == 1


@pytest.mark.parametrize("retry_header", ["bearer alice.1", "BEARER   alice.1", "Bearer alice.1 "])
async def test_the_authorization_scheme_is_case_insensitive(retry_header: str) -> None:
    """Without an auth middleware the Authorization header is the principal; its scheme's case and the spaces
    around the credentials do not make another caller."""
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        await client.post("/pay", content=b"{}", headers=keyed(Authorization="Bearer alice.1"))
        retry = await client.post("/pay", content=b"{}", headers=keyed(Authorization=retry_header))
    assert retry.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_credentials_themselves_are_case_sensitive() -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        await client.post("/pay", content=b"{}", headers=keyed(Authorization="Bearer abc"))
        other = await client.post("/pay", content=b"{}", headers=keyed(Authorization="Bearer ABC"))
    assert "idempotent-replayed" not in other.headers
    assert app.calls == 2


async def test_two_authorization_headers_are_refused() -> None:
    """The app may authenticate one and idempo namespace by the other: neither is trusted."""
    app = CountingApp()
    transport = httpx.ASGITransport(app=IdempotencyMiddleware(app, store=MemoryStore()))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        headers = [("Idempotency-Key", KEY), ("Authorization", "Bearer mine"), ("Authorization", "Bearer theirs")]
        response = await client.post("/pay", content=b"{}", headers=headers)
    document = problem_of(response, 400, "bad-request")
    assert "Authorization" in document["detail"]
    assert app.calls == 0


async def test_anonymous_keyed_requests_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    """A cookie-session app without an identity in the scope: every anonymous caller shares one namespace.
    That is said once, loudly, rather than silently."""
    app = CountingApp()
    with caplog.at_level(logging.WARNING, logger="idempo"):
        async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
            for n in range(3):
                await client.post("/pay", content=b"{}", headers=keyed(f"k{n}", Cookie=f"session=user{n}"))
    warnings = [r for r in caplog.records if "no identity" in r.getMessage()]
    assert len(warnings) == 1


async def test_an_unauthenticated_scope_user_falls_back_to_the_authorization_header() -> None:
    charges = Charges(MemoryStore())
    async with client_for(charges.app) as client:
        anonymous = await client.post("/charges", json={}, headers=keyed())
    assert anonymous.json()["user"] is None
    assert charges.calls == 1


# -- what counts as the same request ---------------------------------------------------------------------------------


async def test_the_same_bytes_as_another_media_type_are_another_request() -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        await client.post("/pay", content=b"a=1", headers=keyed(**{"Content-Type": "application/json"}))
        form = await client.post(
            "/pay", content=b"a=1", headers=keyed(**{"Content-Type": "application/x-www-form-urlencoded"})
        )
    problem_of(form, 422, "key-reused")
    assert app.calls == 1


async def test_media_type_parameters_and_case_do_not_count() -> None:
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=MemoryStore())) as client:
        await client.post("/pay", content=b"{}", headers=keyed(**{"Content-Type": "application/json"}))
        retry = await client.post(
            "/pay", content=b"{}", headers=keyed(**{"Content-Type": "Application/JSON; charset=utf-8"})
        )
    assert retry.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_canonical_json_applies_up_to_its_bound_and_larger_bodies_count_as_sent() -> None:
    """Two encodings of one small document are one request; of a document over the bound, two (a 422, never
    a wrong replay), so that no body holds the event loop for long."""
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), canonical_json=True)
    small = {"b": 1, "a": [1, 2]}
    large = {"b": "x" * CANONICAL_JSON_MAX_BYTES, "a": 1}
    async with client_for(middleware) as client:
        await client.post("/pay", content=json.dumps(small).encode(), headers=keyed("small"))
        same = await client.post(
            "/pay", content=json.dumps(small, indent=2, sort_keys=True).encode(), headers=keyed("small")
        )
        await client.post("/pay", content=json.dumps(large).encode(), headers=keyed("large"))
        other = await client.post("/pay", content=json.dumps(large, sort_keys=True).encode(), headers=keyed("large"))
    assert same.headers["idempotent-replayed"] == "true"
    problem_of(other, 422, "key-reused")
    assert app.calls == 2


# -- a store that is full ----------------------------------------------------------------------------------------------


class FullStore(DelegatingStore):
    """A real store that takes only small writes, as Redis at ``maxmemory`` (noeviction) or a full disk: larger
    completes fail with *error* (the built-in stores raise StoreFullError for those; a user's store may raise a
    plain StoreError)."""

    def __init__(self, inner: MemoryStore, error: type[StoreError] = StoreFullError) -> None:
        super().__init__(inner)
        self.error = error
        self.refused = 0
        self.small_done = asyncio.Event()

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        if len(payload) > 16:
            self.refused += 1
            raise self.error("OOM command not allowed when used memory > 'maxmemory'")
        done = await self.inner.complete(key, token, payload, ttl=ttl)
        self.small_done.set()
        return done


async def test_a_response_the_full_store_refuses_is_kept_as_not_stored_and_never_runs_again() -> None:
    inner = MemoryStore()
    app = CountingApp(status=201)
    async with client_for(IdempotencyMiddleware(app, store=FullStore(inner))) as client:
        first = await client.post("/pay", content=b"{}", headers=keyed())
        retries = [await client.post("/pay", content=b"{}", headers=keyed()) for _ in range(3)]
    assert first.status_code == 201
    for retry in retries:
        document = problem_of(retry, 410, "response-not-stored")
        assert document["original_status"] == 201
        assert document["reason"] == "store_refused"
    assert app.calls == 1


async def test_a_store_that_keeps_failing_gets_the_marker_before_the_lease_runs_out() -> None:
    """A store that fails the response with a plain StoreError (it cannot say it is full) but takes a few bytes:
    the response is tried while the lease lasts, and the marker on the last try, so a retry gets a 410."""
    inner = MemoryStore()
    store = FullStore(inner, error=StoreError)
    app = CountingApp(status=200)
    async with client_for(IdempotencyMiddleware(app, store=store, lease=1.0)) as client:
        await client.post("/pay", content=b"{}", headers=keyed())
        async with asyncio.timeout(10):
            await store.small_done.wait()
        retry = await client.post("/pay", content=b"{}", headers=keyed())
    assert store.refused >= 2  # the response was tried again before falling back
    problem_of(retry, 410, "response-not-stored")
    assert app.calls == 1


# -- responses a server cannot send; records that cannot be read --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        pytest.param(204, [], b"body on a 204", id="body on 204"),
        pytest.param(304, [], b"body on a 304", id="body on 304"),
        pytest.param(200, [(b"content-length", b"100")], b"short", id="content-length too large"),
        pytest.param(200, [(b"content-length", b"1")], b"longer", id="content-length too small"),
    ],
)
async def test_a_response_a_server_cannot_send_is_not_stored_as_it_is(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """httpx's in-process transport delivers what a real server would refuse; the record must not keep it, or every
    replay would fail the same way."""
    store = MemoryStore()
    app = CountingApp(status=status, headers=headers, chunks=[body])
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        with contextlib.suppress(httpx.HTTPError):  # the client could not read it either: that is the point
            await client.post("/pay", content=b"{}", headers=keyed())
        retry = await client.post("/pay", content=b"{}", headers=keyed())
    document = problem_of(retry, 410, "response-not-stored")
    assert document["reason"] == "unsendable"
    assert document["original_status"] == status
    assert app.calls == 1


async def test_a_head_response_keeps_its_content_length() -> None:
    store = MemoryStore()
    app = CountingApp(headers=[(b"content-length", b"42")], chunks=[])
    middleware = IdempotencyMiddleware(app, store=store, methods={"HEAD"})
    async with client_for(middleware) as client:
        await client.head("/thing", headers=keyed())
        retry = await client.head("/thing", headers=keyed())
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["content-length"] == "42"


async def test_a_corrupt_record_is_a_410_for_that_key_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        await client.post("/pay", content=b"{}", headers=keyed())
        (record,) = [record async for record in store.scan()]
        store._records[record.key] = record._replace(payload=b"\x01\x00")  # a torn write
        with caplog.at_level(logging.ERROR, logger="idempo"):
            retries = [await client.post("/pay", content=b"{}", headers=keyed()) for _ in range(3)]
    for retry in retries:
        assert problem_of(retry, 410, "response-not-stored")["reason"] == "unreadable"
    assert len([r for r in caplog.records if "cannot be decoded" in r.getMessage()]) == 1
    assert app.calls == 1


# -- a claim whose answer never came -------------------------------------------------------------------------------


class LateClaims(DelegatingStore):
    """The first claim is made by the store but its answer is lost (a timeout on the way back)."""

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(inner)
        self.lost = 0
        self.released = asyncio.Event()

    async def release(self, key: str, token: str) -> bool:
        released = await self.inner.release(key, token)
        self.released.set()
        return released

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        claim = await self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        if self.lost == 0:
            self.lost += 1
            raise StoreError("timed out waiting for the answer")
        return claim


async def test_a_claim_that_timed_out_but_was_made_is_released_so_the_retry_runs() -> None:
    inner = MemoryStore()
    store = LateClaims(inner)
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store, lease=30)) as client:
        first = await client.post("/pay", content=b"{}", headers=keyed())
        problem_of(first, 503, "store-unavailable")
        async with asyncio.timeout(10):
            await store.released.wait()  # the background release lands
        assert [record async for record in inner.scan()] == []
        retry = await client.post("/pay", content=b"{}", headers=keyed())
    assert retry.status_code == 200  # not a 409 for the rest of a 30 s lease
    assert app.calls == 1


# -- a bad store URL -------------------------------------------------------------------------------------------------


def _app_with_bad_store() -> tuple[Starlette, CountingApp]:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(IdempotencyMiddleware, store="nosuchscheme://x")
    return app, CountingApp()


async def test_a_bad_store_url_under_add_middleware_fails_the_lifespan_start_up() -> None:
    app, _ = _app_with_bad_store()
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "nosuchscheme" in sent[0]["message"]


async def test_a_bad_store_url_without_lifespan_spares_unkeyed_requests() -> None:
    app, _ = _app_with_bad_store()
    async with client_for(app) as client:
        hello = await client.get("/")
        keyed_post = await client.post("/", content=b"{}", headers=keyed())
    assert hello.text == "hello"
    problem_of(keyed_post, 503, "store-unavailable")


def test_a_bad_store_url_given_directly_raises_at_once() -> None:
    with pytest.raises(ConfigurationError, match="nosuchscheme"):
        IdempotencyMiddleware(CountingApp(), store="nosuchscheme://x")
