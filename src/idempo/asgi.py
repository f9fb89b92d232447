"""``IdempotencyMiddleware``: the HTTP contract of idempo as a pure ASGI middleware.

Theory of operation, for one request that carries a key (the answers are the decision table's,
:mod:`idempo._core.decide`; the I/O of one keyed request is :mod:`idempo._asgi.exchange`):

1. Admit it: parse the key (400 if malformed, twice, or missing where required) and buffer the body (413 over
   ``max_request_bytes``).
2. ``claim`` the key in the store under ``<principal digest>:<key>``. The store atomically either hands us the
   key, or returns the record already there, which ``decide`` turns into a replay (same request, completed),
   a 422 (another request under that key), a 409 (still running; or wait for it), a 410 (completed, its response
   not kept) or a 503 (its outcome is unknown).
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
import logging
from collections.abc import Callable, Sequence
from typing import Unpack

from ._asgi.exchange import send_problem, serve
from ._asgi.leases import Renewer
from ._asgi.principals import authorization_principal, default_principal
from ._asgi.startup import fail_startup, open_store
from ._asgi.types import ASGIApp, Message, Receive, Scope, Send
from ._core.cache import CompletedCache
from ._core.decide import Refuse, admit
from ._core.errors import ConfigurationError, InvalidKeyError, RequestError, StoreError
from ._core.fingerprint import principal_digest, scoped_key
from ._core.keys import parse_key
from ._core.policy import Policy, PolicyOptions
from ._core.principal import ANONYMOUS_WARNING, principal_of
from ._core.problem import Problem
from .observe import Observer, Outcome, _ObservedStore, tell
from .stores import Store, takes_token, transaction_target
from .stores.memory import MemoryStore, SyncMemoryStore

logger = logging.getLogger("idempo")

_STARTUP_PROBE = "idempo:startup-check"  # a key no one writes: its get is one harmless round trip
_STARTUP_TIMEOUT = 10.0  # seconds the start-up check waits for the store, at most
_NAMESPACES_MAX = 4096  # Authorization values whose namespace is remembered (then forgotten all at once)


def _no_key(scope: Scope) -> None:
    """A request that is let through without a key still finds one, ``None`` (``request.state.idempotency_key``), so
    that an app can read it on every request."""
    state = scope.get("state")
    if state is None:
        scope["state"] = {"idempotency_key": None}
    elif "idempotency_key" not in state:
        state["idempotency_key"] = None


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


class IdempotencyMiddleware:
    """Run each keyed POST, PUT, PATCH or DELETE once, and replay its response to every retry.

    Use it with ``app.add_middleware(IdempotencyMiddleware, store="sqlite:///idempo.db")`` in FastAPI or
    Starlette, or wrap any ASGI application: ``app = IdempotencyMiddleware(app, store=...)``.

    Args:
        app: the ASGI application to protect.
        store: a :class:`~idempo.Store`, or a store URL for :func:`~idempo.store_from_url`.
        policy: the contract's options as one :class:`~idempo.Policy` (the keyword *options* change it).
        principal: who is asking, from the ASGI scope; records are namespaced by its digest, so that one caller
            never receives another's response. Defaults to the authenticated ``scope["user"]``, else the
            ``Authorization`` header (:func:`default_principal`). It may raise :class:`~idempo.RequestError` to
            refuse a request (400).
        fingerprint: a function of ``(scope, body)`` that digests what the request asks for. Defaults to
            SHA-256 over method, path, raw query string, the body's media type (``Content-Type`` without its
            parameters) and the body (``canonical_json`` applies to the default only).
        observer: told of each request's outcome and of the time of each store call (:mod:`idempo.observe`), for
            metrics. ``None`` (the default) costs nothing.
        **options: any field of :class:`~idempo.Policy`, by name, with its default there: ``ttl`` (86400 s),
            ``lease`` (30 s), ``header``, ``methods``, ``require_key``, ``canonical_json``, ``on_conflict``
            (``"reject"``: 409, or ``"wait"``), ``wait_timeout``, ``on_store_error`` (``"fail_closed"``: 503, or
            ``"fail_open"``), ``retry_after``, ``max_request_bytes``, ``max_response_bytes``,
            ``unknown_outcome_ttl``, ``store_server_errors``, ``replay_set_cookie``, ``problem_base_uri``,
            ``cache_size`` and ``cache_ttl``.

    Raises:
        ConfigurationError: an option out of its range, or a bad store URL (given to ``app.add_middleware``, a bad
            URL fails the application's start-up instead, since Starlette builds middlewares on first use).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | str,
        policy: Policy | None = None,
        principal: Callable[[Scope], str | bytes] = default_principal,
        fingerprint: Callable[[Scope, bytes], str] | None = None,
        observer: Observer | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        try:
            self.policy = policy.with_options(**options) if policy is not None else Policy(**options)
        except TypeError as exc:  # an option that is not one
            raise ConfigurationError(str(exc)) from exc
        self.app = app
        self.unusable: ConfigurationError | None = None  # a bad store URL, answered at start-up (see open_store)
        if isinstance(store, str):
            self.store, self.unusable = open_store(store)
        else:
            self.store = store
        self.principal = principal
        self._default_principal = principal is default_principal
        self.fingerprint = fingerprint
        self.observer = observer
        # What the requests call: the store itself, or, for an observer, the store's calls timed.
        self._calls: Store = self.store if observer is None else _ObservedStore(self.store, observer)
        # A memory store's calls never wait: its blocking twin's are made instead of awaiting its own, which do
        # nothing more (a coroutine less per call). Not a subclass's, which may do more.
        self._inline: SyncMemoryStore | None = (
            self.store.sync() if observer is None and type(self.store) is MemoryStore else None
        )
        self._target = transaction_target(self.store)
        self._renewer: Renewer | None = None
        self._warned_anonymous = False
        # The store key's prefix for each Authorization header value seen (None: no header) of requests the default
        # principal reads from that header alone: the same callers come back.
        self._namespaces: dict[bytes | None, str] = {}
        self._claims_with_token = takes_token(self.store)
        self._background: set[asyncio.Task[None]] = set()  # outcomes still being recorded after a store failure
        self._header = self.policy.header_name
        self._methods = self.policy.methods
        cache_size, cache_ttl = self.policy.cache_size, self.policy.cache_ttl
        self.cache = CompletedCache(cache_size, cache_ttl) if cache_size and cache_ttl else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
            if scope["type"] == "http":
                _no_key(scope)
                if self.observer is not None:
                    tell(self.observer, "passthrough", scope)
            elif scope["type"] == "lifespan":
                if self.unusable is not None:
                    await fail_startup(self.unusable, receive, send)
                    return
                if self.policy.startup_check != "off":
                    send = self._checking_startup(send)
                receive = self._finishing_at_shutdown(receive)
            await self.app(scope, receive, send)
            return
        raw = scope["headers"]
        headers = dict(raw)  # made in C: the key, and the few headers the exchange reads, without a loop in Python
        keys: Sequence[bytes]
        if len(headers) == len(raw):  # no name twice: the dict holds every value
            value = headers.get(self._header)
            if value is not None:  # admit()'s first row, without its call: one key
                try:
                    key = parse_key(value)
                except InvalidKeyError as exc:
                    self._observe("bad_key", scope)
                    await self._send_error(send, exc)
                    return
                await serve(self, scope, receive, send, key, headers)
                return
            keys = ()
        else:
            header = self._header
            keys = []  # a loop rather than a comprehension: no frame of its own (Python 3.11)
            for name, value in raw:
                if name == header:
                    keys.append(value)
        admission = admit(self.policy, keys, scope["path"])
        if type(admission) is str:  # admitted: its key
            await serve(self, scope, receive, send, admission, headers)
            return
        if isinstance(admission, Refuse):
            self._observe("bad_key", scope)
            await self._send_error(send, admission.error)
            return
        _no_key(scope)
        if self.observer is not None:
            tell(self.observer, "passthrough", scope)
        await self.app(scope, receive, send)

    async def check_store(self) -> None:
        """Ask the store once (a ``get``), as the start-up check does.

        Raises:
            StoreError: the store does not answer, or fails (the driver's exception is ``__cause__``).
        """
        try:
            await asyncio.wait_for(self.store.get(_STARTUP_PROBE), _STARTUP_TIMEOUT)
        except StoreError:
            raise
        except Exception as exc:
            msg = f"{exc!r}" if not str(exc) else str(exc)
            raise StoreError(msg) from exc

    async def finish_recording(self) -> None:
        """Wait until the outcomes still being recorded in the background are recorded (after a store failure, or a
        request cancelled while the store had its call), or given up on when their leases run out.

        Done when the server says it shuts down (the ASGI lifespan), before the app hears of it: the process must
        not end with the outcome of an operation that ran still in its memory (once its lease ran out, a retry would
        run the operation again), nor the app's shutdown close what recording it needs. Under a server that runs
        no lifespan, await it from your own shutdown."""
        background = self._background
        while background:
            await asyncio.wait(set(background))

    def _finishing_at_shutdown(self, receive: Receive) -> Receive:
        """*receive* of the lifespan, which :meth:`finish_recording` before it hands the app the server's shutdown."""

        async def finishing() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self._background:
                logger.info("idempo: shutting down once %d outcome(s) still being recorded are", len(self._background))
                await self.finish_recording()
            return message

        return finishing

    def _checking_startup(self, send: Send) -> Send:
        """*send*, checking the store before the app's start-up is said to be complete (``startup_check``)."""

        async def checking(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self.check_store()
                except StoreError as exc:
                    what = f"idempo: the store {self.store!r} does not answer ({exc})"
                    if self.policy.startup_check == "fail":
                        logger.error("%s", what)
                        message = {
                            "type": "lifespan.startup.failed",
                            "message": f"{what}; fix its address, or pass startup_check='warn' to start anyway",
                        }
                    else:
                        logger.warning("%s; starting anyway (startup_check='warn')", what)
            await send(message)

        return checking

    def _namespace_of(self, authorization: bytes | None) -> str:
        """The store key's prefix, ``<principal digest>:``, of a request without a user whose Authorization header is
        *authorization* (``None``: none), under the default principal; remembered."""
        principal = principal_of(None, () if authorization is None else (authorization,))
        if not principal:
            self._warn_anonymous()
        namespaces = self._namespaces
        if len(namespaces) >= _NAMESPACES_MAX:
            namespaces.clear()
        namespace = namespaces[authorization] = scoped_key(principal_digest(principal), "")
        return namespace

    def _warn_anonymous(self) -> None:
        if not self._warned_anonymous:
            self._warned_anonymous = True
            logger.warning(ANONYMOUS_WARNING)

    def _observe(self, outcome: Outcome, scope: Scope) -> None:
        if self.observer is not None:
            tell(self.observer, outcome, scope)

    async def _send_error(self, send: Send, error: RequestError) -> None:
        retry_after = getattr(error, "retry_after", None)
        await send_problem(send, Problem.from_error(error, base_uri=self.policy.problem_base_uri), retry_after)
