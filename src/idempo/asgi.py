"""``IdempotencyMiddleware``: the HTTP contract of idempo as a pure ASGI middleware.

Theory of operation, for one request that carries a key:

1. Parse the key (400 if malformed) and buffer the body (413 over ``max_request_bytes``).
2. ``claim`` the key in the store under ``<principal digest>:<key>``. The store atomically either hands us the
   key, or returns the record already there, which ``decide`` turns into a replay (same request, completed),
   a 422 (another request under that key) or a 409 (still running; or wait for it).
3. Run the app with the buffered body. Its response streams to the client as it comes, and is recorded on the
   side. A timer renews the lease every ``lease / 3`` seconds while the app runs.
4. Just before the last chunk goes out, ``complete`` the record (statuses we keep) or ``release`` it (5xx,
   408, 409, 425, 429, exceptions), so that a client that has the whole response and retries at once always
   sees the final state.

If the client goes away, the app is not told: it runs to completion and its response is stored for the retry.

An app that cannot know whether its operation happened (a payment provider timed out after the request was sent)
says so by raising :class:`~idempo.OutcomeUnknownError` or calling :func:`~idempo.mark_outcome_unknown`: the key is
then completed with the "outcome unknown" marker instead of being released, and retries get a 503 ``outcome-unknown``
problem until the record expires (``unknown_outcome_ttl``) or an operator resolves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping, Sequence
from typing import Any, Literal, NoReturn

from ._core.cache import CompletedCache
from ._core.codec import (
    TooLargeMarker,
    UnsendableResponse,
    decode_parts,
    encode_app_response,
    encode_not_stored,
    encode_outcome_unknown,
    encode_too_large,
)
from ._core.decide import Conflict, Mismatch, NotStored, Replay, decide, fallback, should_store
from ._core.errors import (
    BodyTooLargeError,
    ConfigurationError,
    InvalidKeyError,
    MissingKeyError,
    OutcomeUnknownError,
    RequestError,
    StoreError,
    StoreFullError,
)
from ._core.fingerprint import (
    CANONICAL_JSON_MAX_BYTES,
    canonical_json_body,
    fingerprint_request,
    principal_digest,
    scoped_key,
)
from ._core.keys import parse_key
from ._core.outcome import OutcomeReport
from ._core.principal import ANONYMOUS_WARNING, authorization_value, principal_of
from ._core.problem import DEFAULT_PROBLEM_BASE, Problem
from ._core.records import Acquired, Claim, Record, State, new_token
from .observe import Observer, Outcome, _ObservedStore, tell
from .stores import Store, store_from_url, takes_token

__all__ = [
    "ASGIApp",
    "IdempotencyMiddleware",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "authorization_principal",
    "default_principal",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("idempo")

DEFAULT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REPLAYED = (b"idempotent-replayed", b"true")
# Messages a server may advertise that would let the app send a response we cannot see (a file by path).
_UNRECORDABLE_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopy")
_WAIT_POLL_MAX = 0.5
# Retrying to record an outcome after the store failed: from 50 ms, doubling up to 1 s, while the lease lasts.
_RECORD_RETRY_FIRST = 0.05
_RECORD_RETRY_MAX = 1.0


def authorization_principal(scope: Scope) -> bytes:
    """The principal of the request's ``Authorization`` header: its one value, scheme case normalised (``b""``
    when there is none). Two ``Authorization`` headers are refused with a 400, since the app may believe the one
    and idempo the other."""
    return authorization_value([value for name, value in scope["headers"] if name == b"authorization"])


def default_principal(scope: Scope) -> bytes:
    """The default principal: the authenticated user an auth middleware put in ``scope["user"]`` (Starlette's
    ``AuthenticationMiddleware``, Litestar's auth), else the ``Authorization`` header
    (:func:`authorization_principal`), else ``b""``, which every anonymous caller shares (the middleware warns
    once).

    The user comes first so that a caller keeps their namespace when their access token is refreshed between two
    retries; it is only there if the auth middleware ran before this one (added after it with ``add_middleware``,
    or listed before it in ``middleware=[...]``).
    """
    return principal_of(scope.get("user"), [value for name, value in scope["headers"] if name == b"authorization"])


class IdempotencyMiddleware:
    """Run each keyed POST, PUT, PATCH or DELETE once, and replay its response to every retry.

    Use it with ``app.add_middleware(IdempotencyMiddleware, store="sqlite:///idempo.db")`` in FastAPI or
    Starlette, or wrap any ASGI application: ``app = IdempotencyMiddleware(app, store=...)``.

    Args:
        app: the ASGI application to protect.
        store: a :class:`~idempo.Store`, or a store URL for :func:`~idempo.store_from_url`.
        ttl: seconds a completed response is kept and replayed.
        lease: seconds an in-progress claim is honoured without renewal; renewed every ``lease / 3`` while the
            app runs. If the process dies, a retry runs again once the lease has run out.
        header: the request header that carries the key.
        methods: the methods that are protected; others pass through untouched.
        require_key: ``True`` to answer 400 to protected requests without a key, or a predicate over the
            request path that says where a key is required.
        principal: who is asking, from the ASGI scope; records are namespaced by its digest, so that one caller
            never receives another's response. Defaults to the authenticated ``scope["user"]``, else the
            ``Authorization`` header (:func:`default_principal`). It may raise :class:`~idempo.RequestError` to
            refuse a request (400).
        fingerprint: a function of ``(scope, body)`` that digests what the request asks for. Defaults to
            SHA-256 over method, path, raw query string, the body's media type (``Content-Type`` without its
            parameters) and the body.
        canonical_json: fingerprint JSON bodies in canonical form, so that key order and whitespace do not
            count as a different request. Ignored if *fingerprint* is given.
        canonical_json_max_bytes: the largest body put in canonical form (64 KiB); larger ones are fingerprinted
            as sent. Canonicalising holds the event loop (about 2 ms for 64 KiB, a second or more for 10 MiB).
        on_conflict: ``"reject"`` answers 409 while the first request runs; ``"wait"`` waits up to
            ``wait_timeout`` seconds for it to finish and replays its response (409 if it takes longer).
        wait_timeout: the longest wait with ``on_conflict="wait"``.
        on_store_error: ``"fail_closed"`` answers 503 when the store fails; ``"fail_open"`` runs the app
            unprotected and logs a warning.
        retry_after: the ``Retry-After`` seconds of a 503, and the longest one of a 409.
        max_request_bytes: the largest body accepted with a key (it is buffered to be fingerprinted); 413 above.
        max_response_bytes: the largest response recorded. A larger one still reaches the client whole; the
            operation is marked done and a retry gets a 410 problem document instead of a replay.
        unknown_outcome_ttl: how long a key whose outcome is unknown (:func:`~idempo.mark_outcome_unknown`) stays taken,
            answering retries with a 503 ``outcome-unknown`` problem, in seconds; ``ttl`` by default. Once it runs
            out, a retry runs the operation again: set it only as short as the time after which you know the
            operation can no longer take effect (or resolve keys by hand with ``idempo keys resolve``).
        store_server_errors: keep 5xx responses and replay them, as Stripe does, instead of letting a retry
            run again.
        replay_set_cookie: replay ``Set-Cookie`` headers too. Off by default: a session cookie would otherwise
            be handed out again to whoever retries.
        problem_base_uri: the prefix of the ``type`` of the problem documents the middleware answers.
        cache_size: how many completed responses this process keeps in memory, so that their replays (and
            mismatches) cost no store round trip. ``0`` (the default) turns the cache off. Completed records never
            change, so this never changes an answer, except after an explicit ``Store.delete``: a process that
            cached the record replays it until its cache entry runs out.
        cache_ttl: the longest a response stays in that cache, in seconds (never longer than the store keeps it).
        observer: told of each request's outcome and of the time of each store call (:mod:`idempo.observe`), for
            metrics. ``None`` (the default) costs nothing.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | str,
        ttl: float = 86_400,
        lease: float = 30,
        header: str = "Idempotency-Key",
        methods: Collection[str] = DEFAULT_METHODS,
        require_key: bool | Callable[[str], bool] = False,
        principal: Callable[[Scope], str | bytes] = default_principal,
        fingerprint: Callable[[Scope, bytes], str] | None = None,
        canonical_json: bool = False,
        canonical_json_max_bytes: int = CANONICAL_JSON_MAX_BYTES,
        on_conflict: Literal["reject", "wait"] = "reject",
        wait_timeout: float = 30,
        on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed",
        retry_after: int = 1,
        max_request_bytes: int = 10 * 1024 * 1024,
        max_response_bytes: int = 10 * 1024 * 1024,
        unknown_outcome_ttl: float | None = None,
        store_server_errors: bool = False,
        replay_set_cookie: bool = False,
        problem_base_uri: str = DEFAULT_PROBLEM_BASE,
        cache_size: int = 0,
        cache_ttl: float = 60,
        observer: Observer | None = None,
    ) -> None:
        if ttl <= 0 or lease <= 0:
            msg = f"ttl and lease must be positive (ttl={ttl}, lease={lease})"
            raise ConfigurationError(msg)
        if unknown_outcome_ttl is not None and unknown_outcome_ttl <= 0:
            msg = f"unknown_outcome_ttl must be positive, not {unknown_outcome_ttl}"
            raise ConfigurationError(msg)
        if on_conflict not in ("reject", "wait"):
            msg = f"on_conflict must be 'reject' or 'wait', not {on_conflict!r}"
            raise ConfigurationError(msg)
        if on_store_error not in ("fail_closed", "fail_open"):
            msg = f"on_store_error must be 'fail_closed' or 'fail_open', not {on_store_error!r}"
            raise ConfigurationError(msg)
        if min(max_request_bytes, max_response_bytes, retry_after, wait_timeout, canonical_json_max_bytes) < 0:
            msg = "byte limits, retry_after and wait_timeout must not be negative"
            raise ConfigurationError(msg)
        if cache_size < 0 or cache_ttl < 0:
            msg = f"cache_size and cache_ttl must not be negative (cache_size={cache_size}, cache_ttl={cache_ttl})"
            raise ConfigurationError(msg)
        self.app = app
        self.unusable: ConfigurationError | None = None  # a bad store URL, answered at start-up (see _open_store)
        self.store: Store = _open_store(self, store) if isinstance(store, str) else store
        self.ttl = ttl
        self.lease = lease
        self.header = header.lower().encode("latin-1")
        self.methods = frozenset(method.upper() for method in methods)
        self.require_key = require_key
        self.principal = principal
        self.fingerprint = fingerprint
        self.canonical_json = canonical_json
        self.canonical_json_max_bytes = canonical_json_max_bytes
        self.on_conflict = on_conflict
        self.wait_timeout = wait_timeout
        self.on_store_error = on_store_error
        self.retry_after = retry_after
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.unknown_outcome_ttl = ttl if unknown_outcome_ttl is None else unknown_outcome_ttl
        self.store_server_errors = store_server_errors
        self.replay_set_cookie = replay_set_cookie
        self.problem_base_uri = problem_base_uri
        self.observer = observer
        # What the requests call: the store itself, or, for an observer, the store's calls timed.
        self._calls: Store = self.store if observer is None else _ObservedStore(self.store, observer)
        self._renewer: _Renewer | None = None
        self._warned_anonymous = False
        self._claims_with_token = takes_token(self.store)
        self._background: set[asyncio.Task[None]] = set()  # outcomes still being recorded after a store failure
        self.cache = CompletedCache(cache_size, cache_ttl) if cache_size and cache_ttl else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            if self.observer is not None and scope["type"] == "http":
                tell(self.observer, "passthrough", scope)
            elif self.unusable is not None and scope["type"] == "lifespan":
                await _fail_startup(self.unusable, receive, send)
                return
            await self.app(scope, receive, send)
            return
        header = self.header
        raw_key: bytes | None = None
        for name, value in scope["headers"]:
            if name == header:
                if raw_key is not None:
                    self._observe("bad_key", scope)
                    await self._send_error(send, InvalidKeyError("send exactly one Idempotency-Key header"))
                    return
                raw_key = value
        if raw_key is None:
            if self.require_key is True or (callable(self.require_key) and self.require_key(scope["path"])):
                self._observe("bad_key", scope)
                await self._send_error(send, MissingKeyError("this endpoint requires an Idempotency-Key header"))
                return
            if self.observer is not None:
                tell(self.observer, "passthrough", scope)
            await self.app(scope, receive, send)
            return
        try:
            key = parse_key(raw_key)
        except InvalidKeyError as exc:
            self._observe("bad_key", scope)
            await self._send_error(send, exc)
            return
        await _Exchange(self, scope, receive, send, key).run()

    def _observe(self, outcome: Outcome, scope: Scope) -> None:
        if self.observer is not None:
            tell(self.observer, outcome, scope)

    async def _send_error(self, send: Send, error: RequestError) -> None:
        retry_after = getattr(error, "retry_after", None)
        await _send_problem(send, Problem.from_error(error, base_uri=self.problem_base_uri), retry_after)


def _open_store(middleware: IdempotencyMiddleware, url: str) -> Store:
    """The store of *url*; or, if the URL is bad and the middleware is being built by Starlette or FastAPI for
    their first request (``app.add_middleware``), a store that fails every call.

    Raising there would not stop the server: Starlette builds its middleware stack lazily, on the first ASGI call,
    which is the lifespan's, and uvicorn takes an exception in the lifespan for an app without lifespan support;
    then every request, unkeyed GETs included, would build the stack again and answer 500. Instead the error is
    logged, the lifespan start-up fails with it (uvicorn exits: "Application startup failed"), and, under a server
    that runs no lifespan, unkeyed requests pass through while keyed ones get the 503 of an unusable store.
    """
    try:
        return store_from_url(url)
    except ConfigurationError as exc:
        caller = sys._getframe(2).f_code.co_name  # 0: here, 1: __init__, 2: who made the middleware
        if caller != "build_middleware_stack":
            raise
        logger.error("idempo: %s", exc)
        middleware.unusable = exc
        return _UnusableStore(exc)


class _UnusableStore:
    """Fails every call with the configuration error that made it. Strictly private."""

    def __init__(self, error: ConfigurationError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<unusable store: {self.error}>"

    def _fail(self) -> NoReturn:
        raise StoreError(str(self.error)) from self.error

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self._fail()

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self._fail()

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self._fail()

    async def release(self, key: str, token: str) -> bool:
        self._fail()

    async def get(self, key: str) -> Record | None:
        self._fail()

    async def delete(self, key: str) -> bool:
        self._fail()

    async def purge_expired(self) -> int:
        self._fail()

    async def close(self) -> None:
        return None


async def _fail_startup(error: ConfigurationError, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": f"idempo: {error}"})


async def _send_problem(send: Send, problem: Problem, retry_after: int | None = None) -> None:
    status, headers, body = problem.render(retry_after=retry_after)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Renewer:
    """Renews the leases of the keyed requests running on one event loop. Strictly private.

    One timer per loop rather than one per request: it fires every ``lease / 3`` seconds while requests run and
    renews those that have held their key for at least ``lease / 6`` (so a request is renewed at the latest
    ``lease / 2`` after its claim or its last renewal, leaving half a lease for the store to answer). The timer
    is not re-armed once no request runs, and needs no cancelling.
    """

    __slots__ = ("lease", "loop", "period", "running", "store", "tasks", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store, lease: float) -> None:
        self.loop = loop
        self.store = store
        self.lease = lease
        self.period = lease / 3
        self.running: set[_Exchange] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start the timer; the caller has just added to ``running``."""
        self.timer = self.loop.call_later(self.period, self._sweep)

    def _sweep(self) -> None:
        self.timer = None
        if not self.running:
            return
        threshold = time.monotonic() - self.period / 2
        due = [exchange for exchange in self.running if exchange.renewed_at <= threshold]
        if due:
            task = self.loop.create_task(self._renew(due))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.timer = self.loop.call_later(self.period, self._sweep)

    async def _renew(self, due: list[_Exchange]) -> None:
        await asyncio.gather(*(self._renew_one(exchange) for exchange in due))

    async def _renew_one(self, exchange: _Exchange) -> None:
        started = time.monotonic()
        try:
            owned = await self.store.renew(exchange.store_key, exchange.token, lease=self.lease)
        except Exception as exc:  # noqa: BLE001 - a failed renewal is tried again at the next sweep
            logger.warning("idempo: could not renew the lease of a running request: %s", exc)
            return
        if owned:
            exchange.renewed_at = started
        elif exchange in self.running:
            self.running.discard(exchange)
            logger.warning("idempo: a running request lost its key (its lease ran out and a retry took it over)")


class _Exchange:
    """One keyed request, from its body to its stored response. Strictly private: one per request."""

    __slots__ = (
        "body",
        "chunks",
        "client_gone",
        "done",
        "fingerprint",
        "finished",
        "headers",
        "keep",
        "key",
        "mw",
        "outcome",
        "receive",
        "renewed_at",
        "renewer",
        "scope",
        "send",
        "size",
        "started",
        "status",
        "store",
        "store_key",
        "token",
        "too_large",
    )

    def __init__(self, middleware: IdempotencyMiddleware, scope: Scope, receive: Receive, send: Send, key: str):
        self.mw = middleware
        self.scope = scope
        self.receive = receive
        self.send = send
        self.key = key
        self.store = middleware._calls
        self.store_key = ""
        self.fingerprint = ""
        self.token = ""
        self.body: bytes | None = b""  # None once delivered to the app
        self.renewed_at = 0.0
        self.renewer: _Renewer | None = None
        # What the app answers.
        self.status = 0
        self.started = False  # whether the app's response has started (its status went out)
        self.outcome: OutcomeReport | None = None  # what the app says of it (mark_outcome_unknown), once it runs
        self.headers: Iterable[tuple[bytes, bytes]] = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep = False
        self.too_large = False
        self.finished = False
        self.client_gone = False
        # Set once the response is over; made only if the app asks for a second message (rare).
        self.done: asyncio.Future[None] | None = None

    async def run(self) -> None:
        mw = self.mw
        scope = self.scope
        # A dict of the headers, made in C: cheaper than a loop in Python over them for the two we need here.
        headers = dict(scope["headers"])
        limit = mw.max_request_bytes
        declared = headers.get(b"content-length", b"")
        content_length = int(declared) if declared.isdigit() else -1
        if content_length > limit:
            mw._observe("too_large", scope)
            await mw._send_error(
                self.send,
                BodyTooLargeError(f"the request body is {content_length} bytes; at most {limit} are accepted"),
            )
            return
        # The body: nearly always one message.
        message = await self.receive()
        if message["type"] == "http.disconnect":
            return  # the client left before it finished sending; nothing was claimed
        body = message.get("body", b"")
        if message.get("more_body", False):
            try:
                body = await self._read_rest(body, limit)
            except BodyTooLargeError as exc:
                mw._observe("too_large", scope)
                await mw._send_error(self.send, exc)
                return
            if body is None:
                return
        elif len(body) > limit:
            mw._observe("too_large", scope)
            await mw._send_error(self.send, BodyTooLargeError(f"the request body is over {limit} bytes"))
            return
        self.body = body
        try:
            if mw.principal is default_principal:  # its rule, with the headers dict made above when it can serve
                raw_headers = scope["headers"]
                if len(headers) == len(raw_headers):  # no header name twice: the dict has the only Authorization
                    found = headers.get(b"authorization")
                    authorization: Sequence[bytes] = () if found is None else (found,)
                else:
                    authorization = [value for name, value in raw_headers if name == b"authorization"]
                principal: str | bytes = principal_of(scope.get("user"), authorization)
            else:
                principal = mw.principal(scope)
        except RequestError as exc:
            mw._observe("bad_key", scope)
            await mw._send_error(self.send, exc)
            return
        if not principal and not mw._warned_anonymous and mw.principal is default_principal:
            mw._warned_anonymous = True
            logger.warning(ANONYMOUS_WARNING)
        self.store_key = store_key = scoped_key(principal_digest(principal), self.key)
        if mw.fingerprint is not None:
            fingerprint = mw.fingerprint(scope, body)
        else:
            fingerprint = fingerprint_request(
                scope["method"],
                scope["path"],
                scope.get("query_string", b""),
                canonical_json_body(body, mw.canonical_json_max_bytes) if mw.canonical_json else body,
                headers.get(b"content-type", b""),
            )
        self.fingerprint = fingerprint
        cache = mw.cache
        if cache is not None:
            cached = cache.get(store_key, time.monotonic())
            if cached is not None:  # a completed record: the store's answer, without asking it
                if cached[0] == fingerprint:
                    if mw.observer is not None:
                        tell(mw.observer, "replayed", scope)
                    await self._replay(cached[1])
                else:
                    mw._observe("mismatch", scope)
                    await mw._send_error(self.send, Mismatch().error())
                return
        token = new_token() if mw._claims_with_token else None
        try:
            claim = await self._claim(token)
        except Exception as exc:  # noqa: BLE001 - any failure of a store, ours or a user's, is a store failure
            await self._claim_failed(exc, token)
            return
        if not isinstance(claim, Acquired):
            acquired = await self._answer_existing(claim, fingerprint)
            if acquired is None:
                return
            claim = acquired
        self.token = claim.token
        if mw.observer is not None:
            tell(mw.observer, "executed", scope)
        # Run the app (here rather than in a method of its own: one coroutine less on every message it sends).
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["idempotency_key"] = self.key  # before the scope may be copied below, so that the app's copy has it
        extensions = scope.get("extensions")
        if extensions and ("http.response.pathsend" in extensions or "http.response.zerocopy" in extensions):
            scope = dict(scope)
            scope["extensions"] = {k: v for k, v in extensions.items() if k not in _UNRECORDABLE_EXTENSIONS}
        self.renewed_at = time.monotonic()
        loop = asyncio.get_running_loop()
        renewer = mw._renewer
        if renewer is None or renewer.loop is not loop:  # first request, or a new event loop (tests, threads)
            renewer = mw._renewer = _Renewer(loop, mw._calls, mw.lease)
        self.renewer = renewer
        running = renewer.running
        running.add(self)
        if renewer.timer is None:
            renewer.arm()
        self.outcome = outcome = OutcomeReport.open()
        try:
            await mw.app(scope, self._app_receive, self._send)
        except OutcomeUnknownError as exc:
            outcome.mark_unknown()
            if not self.started:
                self.status = OutcomeUnknownError.status  # what the client is about to get
            await self._record(failed=True)
            if self.started:
                raise  # the response is under way: the server aborts it
            retry_after = math.ceil(mw.unknown_outcome_ttl)
            await mw._send_error(self.send, OutcomeUnknownError.recorded(str(exc), retry_after=retry_after))
        except BaseException:
            await self._record(failed=True)
            raise
        finally:
            outcome.close()
            running.discard(self)
            self._response_over()
        if self.token:
            await self._record(failed=True)  # the app returned without finishing its response

    async def _read_rest(self, first: bytes, limit: int) -> bytes | None:
        """The rest of a body sent in several messages, or ``None`` if the client left."""
        chunks = [first] if first else []
        size = len(first)
        while True:
            if size > limit:
                raise BodyTooLargeError(f"the request body is over {limit} bytes, the most accepted")
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                chunks.append(chunk)
            if not message.get("more_body", False):
                if size > limit:
                    raise BodyTooLargeError(f"the request body is over {limit} bytes, the most accepted")
                return b"".join(chunks)

    async def _answer_existing(self, claim: Claim, fingerprint: str) -> Acquired | None:
        """Answer a request whose key was already there; return a claim if, after waiting, we got the key."""
        mw = self.mw
        deadline = time.monotonic() + mw.wait_timeout
        delay = 0.02
        while True:
            if isinstance(claim, Acquired):
                return claim
            record = claim.record
            now = time.time()
            decision = decide(record, fingerprint, now=now, retry_after=mw.retry_after)
            payload = record.payload
            if mw.cache is not None and record.state is State.COMPLETED and payload and payload[:1] == b"\x01":
                mw.cache.put(self.store_key, record.fingerprint, payload, time.monotonic(), record.expires_at - now)
            if isinstance(decision, Replay):
                if mw.observer is not None:
                    tell(mw.observer, "replayed", self.scope)
                await self._replay(decision.payload)
                return None
            if isinstance(decision, Mismatch):
                mw._observe("mismatch", self.scope)
                await mw._send_error(self.send, decision.error())
                return None
            if not isinstance(decision, Conflict):  # NotStored (410) or Unknown (503): final, nothing runs
                mw._observe("replayed" if isinstance(decision, NotStored) else "outcome_unknown", self.scope)
                await mw._send_error(self.send, decision.error())
                return None
            if mw.on_conflict == "reject" or time.monotonic() + delay > deadline:
                mw._observe("conflict", self.scope)
                await mw._send_error(self.send, decision.error())
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WAIT_POLL_MAX)
            token = new_token() if mw._claims_with_token else None
            try:
                claim = await self._claim(token)
            except Exception as exc:  # noqa: BLE001 - as in run()
                await self._claim_failed(exc, token)
                return None

    def _claim(self, token: str | None) -> Awaitable[Claim]:
        """The store's claim of the key (not a coroutine of its own: one frame less on every request).

        With a store that takes the caller's *token*, it is drawn by the caller, so that a claim whose answer never
        came (a timeout) can be released if the store made it after all: otherwise it would hold the key, and
        retries would get 409s, for a whole lease.
        """
        mw = self.mw
        if token is None:
            return self.store.claim(self.store_key, self.fingerprint, lease=mw.lease, ttl=mw.ttl)
        return self.store.claim(self.store_key, self.fingerprint, lease=mw.lease, ttl=mw.ttl, token=token)

    async def _claim_failed(self, exc: Exception, token: str | None) -> None:
        if token is not None:
            self.renewed_at = time.monotonic()
            self._record_in_background(token, None, self.mw.ttl)  # release it, in case it was made
        await self._store_failed(exc)

    async def _replay(self, payload: bytes) -> None:
        try:
            response = decode_parts(payload)
        except ValueError as exc:
            # A corrupt record: the operation did run (the record is completed), so it is not run again; the client
            # gets the 410 of a response that was not kept. Said once per key and process.
            _log_unreadable(self.store_key, exc)
            await self.mw._send_error(self.send, NotStored(0, "unreadable").error())
            return
        if isinstance(response, tuple):
            status, headers, body = response
            headers.append(_REPLAYED)
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            return
        error = NotStored(response.status, response.reason).error() if isinstance(response, TooLargeMarker) else None
        await self.mw._send_error(self.send, error or OutcomeUnknownError(retry_after=1))

    async def _store_failed(self, exc: Exception) -> None:
        mw = self.mw
        mw._observe("store_error", self.scope)
        if mw.on_store_error == "fail_open":
            logger.warning("idempo: store %r failed (%s); running the request unprotected", self.store, exc)
            self._set_state()
            # Unprotected, the app hears about a disconnect as it would without us: nothing will be recorded.
            body_sent = False

            async def receive() -> Message:
                nonlocal body_sent
                if body_sent:
                    return await self.receive()
                body_sent = True
                return {"type": "http.request", "body": self.body or b"", "more_body": False}

            await mw.app(self.scope, receive, self.send)
            return
        logger.error("idempo: store %r failed: %s", self.store, exc)
        problem = Problem.service_unavailable(
            "the idempotency store is unavailable; retry later with the same key", base_uri=mw.problem_base_uri
        )
        await _send_problem(self.send, problem, retry_after=mw.retry_after)

    def _set_state(self) -> None:
        state = self.scope.get("state")
        if state is None:
            state = self.scope["state"] = {}
        state["idempotency_key"] = self.key

    # -- running the app ------------------------------------------------------------------------------------

    async def _app_receive(self) -> Message:
        """The app's ``receive``: the buffered body, then, once the response is over, a disconnect.

        The app is never told that the client left: it runs to completion so that its response can be stored
        for the retry.
        """
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.finished:
            if self.done is None:
                self.done = asyncio.get_running_loop().create_future()
            await self.done
        return {"type": "http.disconnect"}

    def _response_over(self) -> None:
        self.finished = True
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.finished:
                return
            chunk = message.get("body", b"")
            if self.keep and chunk and not self.too_large:
                self.size += len(chunk)
                if self.size > self.mw.max_response_bytes:
                    self.too_large = True
                    self.chunks.clear()
                else:
                    # A copy (free for bytes): the app may send a memoryview of a buffer it reuses once send returns.
                    self.chunks.append(chunk if type(chunk) is bytes else bytes(chunk))
            if not message.get("more_body", False):
                # Record the outcome before the client has the whole response, so that a retry sent the moment
                # it arrives never finds the key still in progress.
                if self.token:
                    await self._record(failed=False)
                try:
                    if not self.client_gone:
                        await self.send(message)
                except OSError:
                    self.client_gone = True
                finally:
                    # Only now may the app hear "disconnect": apps that listen for it while they send (Starlette's
                    # streaming and file responses under ASGI < 2.4) stop sending when they hear it, and would
                    # drop this last message if told while the outcome was being recorded.
                    self._response_over()
                return
        elif kind == "http.response.start":
            self.started = True
            self.status = status = message["status"]
            self.keep = should_store(status, store_server_errors=self.mw.store_server_errors)
            if self.keep:
                self.headers = message.get("headers", ())
            elif status == 500 and self.outcome is not None and self.outcome.unknown and not self.client_gone:
                await self._answer_unknown()
                return
        if self.client_gone:
            return
        try:
            await self.send(message)
        except OSError:
            # The client went away. Keep going: the response is still recorded for its retry.
            self.client_gone = True

    async def _answer_unknown(self) -> None:
        """Answer the 503 ``outcome-unknown`` problem instead of the 500 a framework made of an
        ``OutcomeUnknownError`` before the middleware could see it (Starlette's ``ServerErrorMiddleware``, when the
        middleware wraps the whole app): a client told 500 would think the operation failed, and try again under a
        new key. The app's own 500 goes nowhere."""
        self.status = OutcomeUnknownError.status
        retry_after = math.ceil(self.mw.unknown_outcome_ttl)
        error = OutcomeUnknownError.recorded("the outcome of this operation is unknown", retry_after=retry_after)
        with contextlib.suppress(OSError):  # a client gone already: the outcome is still recorded
            await self.mw._send_error(self.send, error)
        self.client_gone = True  # what the app sends next is not the client's

    async def _record(self, *, failed: bool) -> None:
        """Complete or release the claim, once. If the store fails, keep trying in the background while our lease
        lasts (the response is the client's already, and must not wait): a store that comes back within the
        lease still gets the outcome, so that a retry replays it instead of running the operation again."""
        if self.token == "":
            return
        token, self.token = self.token, ""
        if self.renewer is not None:
            self.renewer.running.discard(self)
        mw = self.mw
        ttl = mw.ttl
        payload: bytes | None  # None: release the key
        if self.outcome is not None and self.outcome.unknown:  # it may have happened: never released
            payload = encode_outcome_unknown(self.status)
            ttl = mw.unknown_outcome_ttl
            logger.warning("idempo: the outcome of a request is unknown; its key is kept until resolved or expired")
        elif failed or not self.keep:
            payload = None
        elif self.too_large:
            payload = encode_too_large(self.status)
        else:
            try:
                payload = encode_app_response(
                    self.status,
                    self.headers,
                    self.chunks,
                    keep_set_cookie=mw.replay_set_cookie,
                    size=self.size,
                    head=self.scope["method"] == "HEAD",
                )
            except UnsendableResponse as exc:
                logger.error("idempo: a response cannot be sent as it is (%s); it is not stored", exc)
                payload = encode_not_stored(self.status, "unsendable")
        try:
            await self._apply(token, payload, ttl, fall_back=False)  # one store call before the client's last chunk
        except Exception as exc:  # noqa: BLE001 - any failure of a store is retried, never the client's problem
            logger.error("idempo: could not record the outcome of a request (%s); retrying while its lease lasts", exc)
            self._record_in_background(token, payload, ttl)

    def _record_in_background(self, token: str, payload: bytes | None, ttl: float) -> None:
        """Keep trying to record an outcome (*payload* ``None``: release) while the lease lasts."""
        mw = self.mw
        deadline = self.renewed_at + mw.lease  # the lease runs out no later than this (monotonic clock)
        task = asyncio.get_running_loop().create_task(self._record_later(token, payload, ttl, deadline))
        mw._background.add(task)
        task.add_done_callback(mw._background.discard)

    async def _apply(self, token: str, payload: bytes | None, ttl: float, *, fall_back: bool) -> None:
        """Release the key (*payload* ``None``) or complete it with *payload*. If the store refuses that for want
        of room (:class:`~idempo.StoreFullError`), or fails otherwise and *fall_back*, complete it with the
        :func:`~idempo._core.decide.fallback` instead: the few bytes that say the operation ran."""
        store = self.store
        if payload is None:
            await store.release(self.store_key, token)
            return
        try:
            done = await store.complete(self.store_key, token, payload, ttl=ttl)
        except Exception as exc:
            smaller = fallback(payload, self.status) if fall_back or isinstance(exc, StoreFullError) else None
            if smaller is None:
                raise
            logger.error("idempo: could not store a response (%s); storing that the request ran instead", exc)
            done = await store.complete(self.store_key, token, smaller, ttl=ttl)
            payload = smaller
        if not done:
            logger.warning("idempo: a request finished after its key was taken over; its response is not stored")
        elif self.mw.cache is not None and payload[:1] == b"\x01":  # a response; markers are never cached
            self.mw.cache.put(self.store_key, self.fingerprint, payload, time.monotonic(), ttl)

    async def _record_later(self, token: str, payload: bytes | None, ttl: float, deadline: float) -> None:
        delay = _RECORD_RETRY_FIRST
        failure: Exception | None = None
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            # The response itself while there is time for another try (a store that was down keeps it when it comes
            # back); on the last try before the lease runs out, the marker if the response will not go in.
            last = time.monotonic() + min(delay * 2, _RECORD_RETRY_MAX) >= deadline
            try:
                await self._apply(token, payload, ttl, fall_back=last)
            except Exception as exc:  # noqa: BLE001 - as in _record
                failure = exc
                delay = min(delay * 2, _RECORD_RETRY_MAX)
                continue
            logger.warning("idempo: the outcome of a request was recorded after the store came back")
            return
        logger.error(
            "idempo: gave up recording the outcome of a request (%s); once its lease runs out, a retry runs it again",
            failure,
        )


_UNREADABLE_LOGGED: set[str] = set()
_UNREADABLE_LOGGED_MAX = 1024


def _log_unreadable(store_key: str, exc: ValueError) -> None:
    """Log a corrupt stored response once per key (and at most for 1024 keys per process)."""
    if store_key in _UNREADABLE_LOGGED or len(_UNREADABLE_LOGGED) >= _UNREADABLE_LOGGED_MAX:
        return
    _UNREADABLE_LOGGED.add(store_key)
    logger.error("idempo: the stored response of key %r cannot be decoded (%s); retries get a 410", store_key, exc)
