"""``IdempotencyMiddleware`` for WSGI (PEP 3333): the HTTP contract of idempo for Flask, Django, Falcon, Pyramid or
any WSGI application, under gunicorn, uWSGI, mod_wsgi or Waitress.

It behaves as the ASGI middleware (:mod:`idempo.asgi`) does, row by row (the answers are the decision table's,
:mod:`idempo._core.decide`), with a :class:`~idempo.SyncStore`: no event loop is started behind the worker's back.
For one keyed request:

1. Admit it: parse the key (400 if malformed, missing where required, or holding a comma: a WSGI server joins
   repeated headers with commas, so a comma cannot be told from two keys) and buffer the body (413 over
   ``max_request_bytes``; a chunked body, ``wsgi.input_terminated``, is read to its end, bounded).
2. ``claim`` the key under ``<principal digest>:<key>``: a replay, a 422, a 409 (or a bounded wait), a 410 or a 503
   are answered at once, and the app is not called.
3. Run the app with the buffered body (``environ["wsgi.input"]``) and the key in ``environ["idempo.key"]``. Its
   response streams to the client as it comes (``write()`` included) and is recorded on the side; one daemon thread
   renews the leases of the requests running in the process every ``lease / 3`` seconds.
4. Before the last chunk goes out, ``complete`` the record (statuses we keep) or ``release`` it (5xx, 408, 409,
   425, 429, exceptions). The app's iterable is always closed. If the server stops reading (the client left), the
   rest of the app's response is still read and recorded, for the retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Unpack

from ._core.errors import ConfigurationError, OutcomeUnknownError, RequestError
from ._core.policy import Policy, PolicyOptions
from ._core.principal import principal_of
from ._sync.environ import authorization, give_body, read_body, request_path
from ._sync.guard import Answer, FailOpen, Guard, Held, RecordedStream
from ._sync.guard import finish_recording as _finish_recording
from ._sync.stores import check_at_start, check_store, sync_store
from .observe import Observer
from .stores import Store, SyncStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
else:  # the names exist only for type checkers
    StartResponse = WSGIApplication = WSGIEnvironment = Any

__all__ = [
    "KEY_ENVIRON",
    "IdempotencyMiddleware",
    "StartResponse",
    "WSGIApplication",
    "WSGIEnvironment",
    "authorization_principal",
    "default_principal",
    "finish_recording",
    "request_path",
]

logger = logging.getLogger("idempo")

KEY_ENVIRON: Final = "idempo.key"
"""The environ entry where the app finds the request's key (``None`` on every request the middleware lets through
without one)."""

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def finish_recording(timeout: float | None = None) -> bool:
    """Wait until the outcomes this process is still recording in the background are recorded, or given up on when
    their leases run out (at most *timeout* seconds, if given); return whether none is left.

    When the store fails to take the outcome of a request that ran, the blocking faces (this middleware, Django's,
    Flask's) keep trying from a thread of their own while the lease lasts; the thread does not hold the process
    up, so a worker that exits meanwhile (stopped, or recycled by ``max_requests``) would end with the outcome in
    its memory, and once the lease ran out a retry would run the operation again. Call this as the worker exits:
    with gunicorn, from its ``worker_exit`` hook (``gunicorn.conf.py``)::

        def worker_exit(server, worker):
            from idempo.wsgi import finish_recording

            finish_recording(timeout=25)  # within gunicorn's graceful_timeout (30 s)
    """
    return _finish_recording(timeout)


def authorization_principal(environ: WSGIEnvironment) -> bytes:
    """The principal of the request's ``Authorization`` header (``b""`` when there is none)."""
    return principal_of(None, authorization(environ))


def default_principal(environ: WSGIEnvironment) -> bytes:
    """The default principal: an authenticated user a WSGI middleware left in ``environ["idempo.user"]`` (any object
    with ``id``, ``pk`` or ``username``), else the ``Authorization`` header, else ``b""``, which every anonymous
    caller shares (the middleware warns once). Behind cookie sessions, pass ``principal=`` (see the production
    guide)."""
    return principal_of(environ.get("idempo.user"), authorization(environ))


class IdempotencyMiddleware:
    """Run each keyed POST, PUT, PATCH or DELETE of a WSGI application once, and replay its response to every retry.

    ``app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store="sqlite:///idempo.db")`` (Flask: or use
    :class:`idempo.flask.Idempotency`), ``application = IdempotencyMiddleware(get_wsgi_application(), store=...)``.

    Args:
        app: the WSGI application to protect.
        store: a :class:`~idempo.SyncStore`, an async store with a ``.sync()`` twin (every built-in one), or a store
            URL for :func:`~idempo.sync_store_from_url`.
        policy: the contract's options as one :class:`~idempo.Policy` (the keyword *options* change it).
        principal: who is asking, from the environ; records are namespaced by its digest. Defaults to
            :func:`default_principal`. It may raise :class:`~idempo.RequestError` to refuse a request (400).
        fingerprint: a function of ``(environ, body)`` that digests what the request asks for. Defaults to SHA-256
            over method, path, raw query string, the body's media type and the body.
        observer: told of each request's outcome and of the time of each store call (:mod:`idempo.observe`).
        **options: any field of :class:`~idempo.Policy`, by name, as for the ASGI middleware.

    Raises:
        ConfigurationError: an option out of its range, a bad store URL, or an async store without a sync twin.
        StoreError: the store does not answer when the middleware is built (``startup_check="fail"``, the default:
            the worker does not boot; ``"warn"`` logs it and goes on, ``"off"`` does not ask).
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        store: SyncStore | Store | str,
        policy: Policy | None = None,
        principal: Callable[[WSGIEnvironment], str | bytes] = default_principal,
        fingerprint: Callable[[WSGIEnvironment, bytes], str] | None = None,
        observer: Observer | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        try:
            self.policy = policy.with_options(**options) if policy is not None else Policy(**options)
        except TypeError as exc:  # an option that is not one
            raise ConfigurationError(str(exc)) from exc
        self.app = app
        self.store = sync_store(store)
        self.principal = principal
        self.fingerprint = fingerprint
        self.guard = Guard(self.store, self.policy, observer)
        self._environ_key = "HTTP_" + self.policy.header.upper().replace("-", "_")
        check_at_start(self.store, self.policy)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        guard = self.guard
        method = environ["REQUEST_METHOD"]
        if method not in guard.methods:
            return self._pass(environ, start_response)
        path = request_path(environ)
        admitted = guard.admit(environ.get(self._environ_key), path)
        if admitted is None:
            return self._pass(environ, start_response)
        if isinstance(admitted, Answer):
            return _send(guard, environ, start_response, admitted)
        body = read_body(guard, environ)
        if isinstance(body, Answer):
            return _send(guard, environ, start_response, body)
        try:
            principal = self.principal(environ)
        except RequestError as exc:
            return _send(guard, environ, start_response, guard.refuse("bad_key", exc))
        if self.principal is default_principal:
            guard.warn_anonymous(principal)
        if self.fingerprint is not None:
            fingerprint = self.fingerprint(environ, body)
        else:
            query = environ.get("QUERY_STRING", "").encode("latin-1")
            content_type = environ.get("CONTENT_TYPE", "").encode("latin-1")
            fingerprint = guard.fingerprint(method, path, query, content_type, body)
        claimed = guard.claim(admitted, principal, fingerprint)
        if isinstance(claimed, Answer):
            return _send(guard, environ, start_response, claimed)
        give_body(environ, body)
        environ[KEY_ENVIRON] = admitted
        if isinstance(claimed, FailOpen):
            guard.observe("store_error", environ)
            return self.app(environ, start_response)
        guard.observe("executed", environ)
        return _Response(self.app, claimed, environ, start_response).run()

    def check_store(self) -> None:
        """Ask the store once (a ``get``), as the start-up check does when the middleware is built (the WSGI
        protocol has no start-up event of its own); e.g. for a readiness probe.

        Raises:
            StoreError: the store does not answer, or fails (the driver's exception is ``__cause__``).
        """
        check_store(self.store)

    def _pass(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[KEY_ENVIRON] = None
        self.guard.observe("passthrough", environ)
        return self.app(environ, start_response)


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _str_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def _send(guard: Guard, environ: WSGIEnvironment, start_response: StartResponse, answer: Answer) -> list[bytes]:
    guard.observe(answer.outcome, environ)
    start_response(_status_line(answer.status), _str_headers(answer.headers))
    return [answer.body]


class _Response:
    """The app's response to one claimed request: captured as it goes out, and recorded before its last chunk."""

    __slots__ = (
        "app",
        "environ",
        "head",
        "headers",
        "held",
        "server_write",
        "start_response",
        "status",
        "swapped",
    )

    def __init__(self, app: WSGIApplication, held: Held, environ: WSGIEnvironment, start_response: StartResponse):
        self.app = app
        self.held = held
        self.environ = environ
        self.start_response = start_response
        self.head = environ["REQUEST_METHOD"] == "HEAD"
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.server_write: Callable[[bytes], object] | None = None  # once the server's start_response was called
        self.swapped = False  # the response is the outcome-unknown problem, not the app's

    def run(self) -> Iterable[bytes]:
        held = self.held
        held.enter(head=self.head)
        try:
            result = self.app(self.environ, self._start_response)
        except OutcomeUnknownError:
            held.mark_unknown()
            held.finish(failed=True)
            if self.server_write is not None:
                raise  # the response is under way: the server aborts it
            return _send(held.guard, self.environ, self.start_response, held.guard.unknown())
        except BaseException:
            held.finish(failed=True)
            raise
        finally:
            held.leave()
        if type(result) is list and self.status and not self.swapped:
            # The common case (Flask, Django): the whole body at once, so nothing streams and it is recorded now.
            for chunk in result:
                held.chunk(chunk)
            held.finish(head=self.head)
            self._start()
            return result
        return _Streaming(self, held.stream(result, head=self.head, before=self._start))

    def _start_response(self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None) -> Any:
        if exc_info is not None and exc_info[0] is not None:
            if self.server_write is not None:
                raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: too late to change the response
        elif self.status:
            msg = "start_response was called twice without exc_info"
            raise AssertionError(msg)
        self.status = status  # the server has not been called yet: exc_info need not reach it
        self.headers = headers
        encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        self.swapped = not self.held.start(int(status[:3]), encoded)
        return self._write

    def _start(self) -> None:
        """Call the server's start_response, once, with the app's status (or the outcome-unknown problem's)."""
        if self.server_write is not None:
            return
        if self.swapped:
            answer = self.held.guard.unknown()
            self.server_write = self.start_response(_status_line(answer.status), _str_headers(answer.headers))
        else:
            self.server_write = self.start_response(self.status, self.headers)

    def _write(self, data: bytes) -> None:
        """The app's ``write()``: the data goes out at once (so it is recorded after it left), and is recorded."""
        self.held.chunk(data)
        if self.swapped:
            return
        self._start()
        assert self.server_write is not None
        self.server_write(data)


class _Streaming:
    """A streaming response as the server reads it: the app's chunks (recorded as they go), or, if the app's status
    turns out to be the 500 of an outcome it said is unknown, the 503 problem instead."""

    __slots__ = ("done", "response", "stream")

    def __init__(self, response: _Response, stream: RecordedStream) -> None:
        self.response = response
        self.stream = stream
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.done:
            raise StopIteration
        response = self.response
        for chunk in self.stream:
            if not response.swapped:
                return chunk
        self.done = True
        if not response.status:
            msg = "the application returned without calling start_response"
            raise RuntimeError(msg)
        response._start()
        if response.swapped:
            return response.held.guard.unknown().body
        raise StopIteration

    def close(self) -> None:
        self.stream.close()
