"""One keyed request through the ASGI middleware, from its body to its recorded outcome. Strictly private.

This is the I/O around the decision table (:mod:`idempo._core.decide`): it reads the body, claims the key, runs the
app while its response streams to the client and is captured, and records the outcome. Every answer it gives is
one the table chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

from .._core.bound import COMMITTED, Bound
from .._core.decide import (
    MISMATCH,
    Conflict,
    FailOpen,
    Mismatch,
    NotStored,
    Replay,
    Wait,
    body_too_large,
    decide,
    decide_cached,
    on_store_failure,
    record_for,
    record_response,
    replay,
    replayable,
    should_store,
    wait_or_answer,
)
from .._core.errors import OutcomeUnknownError, RequestError, ResponseNotStoredError
from .._core.fingerprint import canonical_json_body, fingerprint_request, principal_digest, scoped_key
from .._core.outcome import OutcomeReport
from .._core.principal import principal_of
from .._core.problem import Problem
from .._core.records import Acquired, Claim, State, new_token
from ..observe import Outcome, tell
from .leases import Renewer
from .principals import default_principal
from .recording import Recording
from .types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ..asgi import IdempotencyMiddleware

__all__ = ["Exchange", "send_problem", "serve"]

logger = logging.getLogger("idempo")

_REPLAYED: Final = (b"idempotent-replayed", b"true")
# Messages a server may advertise that would let the app send a response we cannot see (a file by path).
_UNRECORDABLE_EXTENSIONS: Final = ("http.response.pathsend", "http.response.zerocopy")


async def send_problem(send: Send, problem: Problem, retry_after: int | None = None) -> None:
    """Answer *problem* (an RFC 9457 document) as the whole response."""
    status, headers, body = problem.render(retry_after=retry_after)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def serve(
    mw: IdempotencyMiddleware, scope: Scope, receive: Receive, send: Send, key: str, headers: dict[bytes, bytes]
) -> None:
    """One admitted keyed request (its *key*; *headers*, the request's as a dict, made by the middleware): its body
    read, its key claimed, and then the stored response replayed or the app run (:meth:`Exchange.run`), as the
    decision table says. The :class:`Exchange` is made only past a replay: a replay needs no object of its own."""
    policy = mw.policy
    declared = headers.get(b"content-length", b"")
    checked = -1  # the size body_too_large found fitting, if the body declared its length
    if declared.isdigit():
        checked = int(declared)
        if checked > policy.max_request_bytes:  # body_too_large's test, without its call when it fits
            error = body_too_large(policy, checked, declared=True)
            if error is not None:
                await Exchange(mw, scope, receive, send, key, headers, b"")._refuse("too_large", error)
                return
    # The body: nearly always one message (read here: a coroutine less on every request).
    message = await receive()
    if message["type"] == "http.disconnect":
        return  # the client left before it finished sending; nothing was claimed
    body = message.get("body", b"")
    more = message.get("more_body", False)
    if more or (len(body) != checked and body_too_large(policy, len(body)) is not None):
        body = await Exchange(mw, scope, receive, send, key, headers, b"")._read_rest(body, more)
        if body is None:
            return  # the client left, or a 413 was answered
    raw_headers = scope["headers"]
    if mw._default_principal and len(headers) == len(raw_headers) and scope.get("user") is None:
        # The default principal of a request with no user and no header name twice: its Authorization header's
        # (or none), whose namespace the middleware remembers.
        authorization = headers.get(b"authorization")
        namespace = mw._namespaces.get(authorization)
        if namespace is None:
            namespace = mw._namespace_of(authorization)
        store_key = namespace + key
    else:
        try:
            if mw.principal is default_principal:
                if len(headers) == len(raw_headers):  # the dict holds the only Authorization header there is
                    found = headers.get(b"authorization")
                    authorization_values: Sequence[bytes] = () if found is None else (found,)
                else:
                    authorization_values = [value for name, value in raw_headers if name == b"authorization"]
                principal: str | bytes = principal_of(scope.get("user"), authorization_values)
                if not principal:
                    mw._warn_anonymous()
            else:
                principal = mw.principal(scope)
        except RequestError as exc:
            await Exchange(mw, scope, receive, send, key, headers, body)._refuse("bad_key", exc)
            return
        store_key = scoped_key(principal_digest(principal), key)
    if mw.fingerprint is not None:
        fingerprint = mw.fingerprint(scope, body)
    else:
        fingerprint = fingerprint_request(
            scope["method"],
            scope["path"],
            scope.get("query_string", b""),
            canonical_json_body(body, policy.canonical_json_max_bytes) if policy.canonical_json else body,
            headers.get(b"content-type", b""),
        )
    payload: bytes | None = None  # a stored response to replay
    cache = mw.cache
    if cache is not None:
        cached = cache.get(store_key, time.monotonic())
        if cached is not None:  # a completed record: the store's answer, without asking it
            answer = decide_cached(cached[0], cached[1], fingerprint)
            if type(answer) is not bytes:
                await Exchange(mw, scope, receive, send, key, headers, body, store_key, fingerprint)._refuse(
                    "mismatch", MISMATCH.error()
                )
                return
            payload = answer
    if payload is None:
        # The claim, made here (not in a method of its own: a frame less on every request); see _claim.
        inline = mw._inline
        token = None  # the new owner's, if this request draws it (released with it if the claim goes unanswered)
        try:
            if inline is not None:
                # A memory store's claim never goes unanswered: it draws the token itself, only if it takes the key.
                claim = inline.claim(store_key, fingerprint, lease=policy.lease, ttl=policy.ttl)
            elif mw._claims_with_token:
                token = new_token()
                claim = await mw._calls.claim(store_key, fingerprint, lease=policy.lease, ttl=policy.ttl, token=token)
            else:
                claim = await mw._calls.claim(store_key, fingerprint, lease=policy.lease, ttl=policy.ttl)
        except Exception as exc:  # noqa: BLE001 - any failure of a store, ours or a user's, is a store failure
            await Exchange(mw, scope, receive, send, key, headers, body, store_key, fingerprint)._claim_failed(
                exc, token
            )
            return
        except asyncio.CancelledError:
            Exchange(mw, scope, receive, send, key, headers, body, store_key, fingerprint)._release_unanswered(
                token, cancelled=True
            )
            raise
        if isinstance(claim, Acquired):
            exchange = Exchange(mw, scope, receive, send, key, headers, body, store_key, fingerprint)
            claimed = claim.token
        else:
            # The usual answer first, as decide() would give it: the stored response, replayed.
            payload = replayable(claim.record, fingerprint) if cache is None else None
            if payload is None:
                exchange = Exchange(mw, scope, receive, send, key, headers, body, store_key, fingerprint)
                acquired = await exchange._answer_existing(claim)
                if acquired is None:
                    return
                claimed = acquired.token
    if payload is not None:  # _replay's, without its coroutine
        replayed = replay(payload)
        if isinstance(replayed, RequestError):
            await Exchange(mw, scope, receive, send, key, headers, body, store_key, fingerprint)._unreplayable(replayed)
            return
        if mw.observer is not None:
            tell(mw.observer, "replayed", scope)
        status, replayed_headers, body = replayed
        replayed_headers.append(_REPLAYED)
        await send({"type": "http.response.start", "status": status, "headers": replayed_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    # The key is ours.
    exchange.token = exchange.claimed = claimed
    exchange.renewed_at = time.monotonic()
    if mw.observer is not None:
        tell(mw.observer, "executed", scope)
    # Run the app (here rather than in a method of its own: one coroutine less on every message it sends).
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    state["idempotency_key"] = exchange.key  # before the scope may be copied below, so that the app's copy has it
    extensions = scope.get("extensions")
    if extensions and ("http.response.pathsend" in extensions or "http.response.zerocopy" in extensions):
        scope = dict(scope)
        scope["extensions"] = {k: v for k, v in extensions.items() if k not in _UNRECORDABLE_EXTENSIONS}
    # The exchange is its own outcome report (no object of its own): the current one while the app runs; its Bound
    # is made only if a binding asks for it (Exchange.bind).
    exchange.enter()
    exchange.reporting = True
    loop = asyncio.get_running_loop()
    renewer = mw._renewer
    if renewer is None or renewer.loop is not loop:  # first request, or a new event loop (tests, threads)
        renewer = mw._renewer = Renewer(loop, mw._calls, policy.lease)
    exchange.renewer = renewer
    running = renewer.running
    running.add(exchange)
    if renewer.timer is None:
        renewer.arm()
    try:
        await mw.app(scope, exchange._app_receive, exchange._send)
    except OutcomeUnknownError as exc:
        exchange.mark_unknown()
        if not exchange.started:
            exchange.status = OutcomeUnknownError.status  # what the client is about to get
        await exchange._record(failed=True)
        if exchange.started:
            raise  # the response is under way: the server aborts it
        retry_after = math.ceil(policy.kept_unknown_for)
        await mw._send_error(exchange.send, OutcomeUnknownError.recorded(str(exc), retry_after=retry_after))
    except BaseException:
        await exchange._record(failed=True)
        raise
    finally:
        exchange.close()
        running.discard(exchange)
        exchange._response_over()
    if exchange.token:
        await exchange._record(failed=True)  # the app returned without finishing its response


class Exchange(Recording, OutcomeReport):
    """One keyed request, from its body to its stored response. Strictly private: one per request.

    Made by :func:`serve` once a request is past the replay of a stored response (which needs no object of its
    own); it is also the request's outcome report while the app runs.
    """

    __slots__ = (
        "body",
        "chunks",
        "claimed",
        "client_gone",
        "done",
        "fingerprint",
        "finished",
        "headers",
        "keep",
        "key",
        "mw",
        "receive",
        "renewed_at",
        "renewer",
        "reporting",
        "request_headers",
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

    def __init__(
        self,
        middleware: IdempotencyMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        key: str,
        headers: dict[bytes, bytes],
        body: bytes,
        store_key: str = "",
        fingerprint: str = "",
    ):
        self.mw = middleware
        self.scope = scope
        self.receive = receive
        self.send = send
        self.key = key
        # The request's headers as a dict, made by the middleware (a name sent twice: its last value).
        self.request_headers = headers
        self.store = middleware._calls
        self.store_key = store_key
        self.fingerprint = fingerprint
        self.body: bytes | None = body  # None once delivered to the app
        self.token = ""  # the claim's, once the key is ours; "" again once its outcome is recorded
        self.claimed = ""  # the claim's, for good
        self.renewed_at = 0.0
        self.renewer: Renewer | None = None
        # What the app says of it (mark_outcome_unknown), once it runs: the exchange is its own report, then
        # (reporting). No attribute refers to the exchange itself: a reference cycle would leave every keyed request
        # to the garbage collector, whose passes cost more than the rest of the middleware (see bind).
        self.reporting = False
        self.unknown = False
        self.made = None
        self.claimant = None
        # What the app answers.
        self.status = 0
        self.started = False  # whether the app's response has started (its status went out)
        self.headers: Iterable[tuple[bytes, bytes]] = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep = False
        self.too_large = False
        self.finished = False
        self.client_gone = False
        # Set once the response is over; made only if the app asks for a second message (rare).
        self.done: asyncio.Future[None] | None = None

    @property
    def bound(self) -> Bound | None:
        """:class:`OutcomeReport`'s, the exchange its own claimant (not ``self.claimant = self``: a cycle)."""
        bound = self.made
        if bound is None:
            bound = self.made = self.bind()
        return bound

    @bound.setter
    def bound(self, bound: Bound | None) -> None:
        self.made = bound

    def bind(self) -> Bound:
        """The claim as the transaction bindings see it (made when one first asks: :attr:`bound`)."""
        mw = self.mw
        head = self.scope["method"] == "HEAD"
        return Bound(mw.policy, mw.store, mw._target, self.store_key, self.claimed, head=head)

    async def _read_rest(self, first: bytes, more: bool) -> bytes | None:
        """The whole body, from its first message's *first* bytes (*more* to come); ``None`` if the client left, or
        if it was too large (the 413 is answered)."""
        policy = self.mw.policy
        chunks = [first] if first else []
        size = len(first)
        while True:
            error = body_too_large(policy, size)
            if error is not None:
                await self._refuse("too_large", error)
                return None
            if not more:
                return b"".join(chunks)
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                chunks.append(chunk)
            more = message.get("more_body", False)

    # -- the claim ------------------------------------------------------------------------------------------

    async def _answer_existing(self, claim: Claim) -> Acquired | None:
        """Answer a request whose key was already there, as :func:`decide` says (waiting for the first request, with
        ``on_conflict="wait"``, as :func:`wait_or_answer` says, and claiming again); return a claim if, after
        waiting, the key was ours."""
        mw = self.mw
        policy = mw.policy
        started = 0.0
        delay = 0.0
        while True:
            if isinstance(claim, Acquired):
                return claim
            record = claim.record
            now = time.time()
            decision = decide(record, self.fingerprint, now=now, retry_after=policy.retry_after)
            payload = record.payload
            if mw.cache is not None and record.state is State.COMPLETED and payload and payload[:1] == b"\x01":
                mw.cache.put(self.store_key, record.fingerprint, payload, time.monotonic(), record.expires_at - now)
            if isinstance(decision, Conflict):
                if not started:
                    started = time.monotonic()
                step = wait_or_answer(policy, decision, waited=time.monotonic() - started, delay=delay)
                if isinstance(step, Wait):
                    await asyncio.sleep(step.seconds)
                    delay = step.seconds
                    token = new_token() if mw._claims_with_token else None
                    try:
                        claim = await self._claim(token)
                    except Exception as exc:  # noqa: BLE001 - as in serve()
                        await self._claim_failed(exc, token)
                        return None
                    except asyncio.CancelledError:
                        self._release_unanswered(token, cancelled=True)
                        raise
                    continue
                await self._refuse("conflict", decision.error())
            elif isinstance(decision, Replay):
                await self._replay(decision.payload)
            elif isinstance(decision, Mismatch):
                await self._refuse("mismatch", decision.error())
            else:  # NotStored (410) or Unknown (503): final, nothing runs
                await self._refuse(
                    "replayed" if isinstance(decision, NotStored) else "outcome_unknown", decision.error()
                )
            return None

    def _claim(self, token: str | None) -> Awaitable[Claim]:
        """The store's claim of the key (not a coroutine of its own: one frame less on every request).

        With a store that takes the caller's *token*, it is drawn by the caller, so that a claim whose answer never
        came (a timeout) can be released if the store made it after all: otherwise it would hold the key, and
        retries would get 409s, for a whole lease.
        """
        policy = self.mw.policy
        if token is None:
            return self.store.claim(self.store_key, self.fingerprint, lease=policy.lease, ttl=policy.ttl)
        return self.store.claim(self.store_key, self.fingerprint, lease=policy.lease, ttl=policy.ttl, token=token)

    def _release_unanswered(self, token: str | None, *, cancelled: bool = False) -> None:
        """A claim whose answer never came (the store failed, or the request was *cancelled* meanwhile) may have been
        made: release it with the *token* the request drew (nothing ran), in the background, so that a retry is not
        told to wait for a whole lease. Without a token (a store that draws its own), nothing to release."""
        if token is not None:
            self._record_in_background(token, None, 0, time.monotonic() + self.mw.policy.lease, cancelled=cancelled)

    async def _claim_failed(self, exc: Exception, token: str | None) -> None:
        mw = self.mw
        self._release_unanswered(token)
        self._observe("store_error")
        answer = on_store_failure(mw.policy)
        if isinstance(answer, FailOpen):
            logger.warning("idempo: store %r failed (%s); running the request unprotected", mw.store, exc)
            await self._run_unprotected()
            return
        logger.error("idempo: store %r failed: %s", mw.store, exc)
        await send_problem(self.send, answer.problem(mw.policy.problem_base_uri), retry_after=answer.retry_after)

    async def _run_unprotected(self) -> None:
        self._set_key()
        # Unprotected, the app hears about a disconnect as it would without us: nothing will be recorded.
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if body_sent:
                return await self.receive()
            body_sent = True
            return {"type": "http.request", "body": self.body or b"", "more_body": False}

        await self.mw.app(self.scope, receive, self.send)

    # -- answers --------------------------------------------------------------------------------------------

    def _observe(self, outcome: Outcome) -> None:
        observer = self.mw.observer
        if observer is not None:
            tell(observer, outcome, self.scope)

    async def _refuse(self, outcome: Outcome, error: RequestError) -> None:
        self._observe(outcome)
        await self.mw._send_error(self.send, error)

    async def _replay(self, payload: bytes) -> None:
        answer = replay(payload)
        if isinstance(answer, RequestError):
            await self._unreplayable(answer)
            return
        if self.mw.observer is not None:
            tell(self.mw.observer, "replayed", self.scope)
        status, headers, body = answer
        headers.append(_REPLAYED)
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _unreplayable(self, error: RequestError) -> None:
        """Answer the problem of a stored payload that is not a response to replay (:func:`replay`'s *error*)."""
        if isinstance(error, ResponseNotStoredError) and error.reason == "unreadable":
            _log_unreadable(self.store_key)
        await self._refuse("replayed", error)

    def _set_key(self) -> None:
        """Put the key where the app finds it (``request.state.idempotency_key``)."""
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
                if self.size > self.mw.policy.max_response_bytes:
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
            self.keep = should_store(status, store_server_errors=self.mw.policy.store_server_errors)
            if self.keep:
                self.headers = message.get("headers", ())
            elif status == 500 and self.reporting and self.unknown and not self.client_gone:
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
        retry_after = math.ceil(self.mw.policy.kept_unknown_for)
        error = OutcomeUnknownError.recorded("the outcome of this operation is unknown", retry_after=retry_after)
        with contextlib.suppress(OSError):  # a client gone already: the outcome is still recorded
            await self.mw._send_error(self.send, error)
        self.client_gone = True  # what the app sends next is not the client's

    # -- recording the outcome ------------------------------------------------------------------------------

    async def _record(self, *, failed: bool) -> None:
        """Complete or release the claim, once, as :func:`record_for` says. If the store fails, keep trying in the
        background while our lease lasts (the response is the client's already, and must not wait): a store that
        comes back within the lease still gets the outcome, so that a retry replays it instead of running the
        operation again."""
        token = self.token
        if token == "":
            return
        self.token = ""
        if self.renewer is not None:
            self.renewer.running.discard(self)
        unknown = False
        if self.reporting:
            bound = self.made  # made only if a binding asked for it
            if bound is not None and bound.state == COMMITTED:  # the app's transaction completed the key
                self._recorded_in_transaction()
                return
            unknown = self.unknown
        policy = self.mw.policy
        head = self.scope["method"] == "HEAD"
        if not failed and self.keep and not self.too_large and not unknown:  # a response like any other
            recorded = record_response(policy, self.status, self.headers, self.chunks, self.size, head)
        else:
            if unknown:
                logger.warning("idempo: the outcome of a request is unknown; its key is kept until resolved or expired")
            recorded = record_for(
                policy,
                self.status,
                self.headers,
                self.chunks,
                size=self.size,
                failed=failed,
                kept=self.keep,
                too_large=self.too_large,
                unknown=unknown,
                head=head,
            )
        payload, ttl, unsendable = recorded
        if unsendable is not None:
            logger.error("idempo: a response cannot be sent as it is (%s); it is not stored", unsendable)
        try:  # one store call, at most (_apply's, without its coroutine)
            if payload is None:
                await self.store.release(self.store_key, token)
            else:
                try:
                    inline = self.mw._inline
                    if inline is not None:
                        done = inline.complete(self.store_key, token, payload, ttl=ttl)
                    else:
                        done = await self.store.complete(self.store_key, token, payload, ttl=ttl)
                except Exception as exc:  # noqa: BLE001 - raised again unless the fallback is what it calls for
                    payload, done = await self._complete_smaller(exc, token, payload, ttl, fall_back=False)
                if not done or self.mw.cache is not None:
                    self._completed(done, payload, ttl)
        except Exception as exc:  # noqa: BLE001 - any failure of a store is retried, never the client's problem
            logger.error("idempo: could not record the outcome of a request (%s); retrying while its lease lasts", exc)
            self._record_in_background(token, recorded.payload, ttl, self.renewed_at + policy.lease)
        except asyncio.CancelledError:
            # Cancelled while the store had the call (a server shutting down, a disconnect turned into a
            # cancellation): it may not have been made. The outcome must not be lost with the request (after the
            # lease, a retry would run the operation again): made again in the background.
            self._record_in_background(token, recorded.payload, ttl, self.renewed_at + policy.lease, cancelled=True)
            raise


_UNREADABLE_LOGGED: set[str] = set()
_UNREADABLE_LOGGED_MAX: Final = 1024


def _log_unreadable(store_key: str) -> None:
    """Log a corrupt stored response once per key (and at most for 1024 keys per process)."""
    if store_key in _UNREADABLE_LOGGED or len(_UNREADABLE_LOGGED) >= _UNREADABLE_LOGGED_MAX:
        return
    _UNREADABLE_LOGGED.add(store_key)
    logger.error("idempo: the stored response of key %r cannot be decoded; retries get a 410", store_key)
