"""The three blocking faces of idempo as adapters of one contract suite (``tests/test_wsgi_contract.py``): a neutral
description of an app's behaviour (:class:`Behaviour`), built by each :class:`Face` into a real app of its framework
that counts its executions (:class:`Executions`), served in process by :class:`WSGIServer` (an httpx transport that
calls a WSGI callable as a server does: repeated headers joined by commas, ``write()`` data sent, the iterable read
lazily and always closed, a chunked body, a client that leaves early), and :class:`SpyStore`, a user-written
``SyncStore`` that hands every call to a real store, counts claims and renewals, and fails the calls it is told to.

Django's ``WSGIHandler`` and a Flask app are WSGI callables too, so one client type serves all three faces.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import httpx

from idempo import Claim, OutcomeUnknownError, Record, StoreError, StoreFullError, mark_outcome_unknown
from idempo.stores import SyncStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
else:
    StartResponse = WSGIApplication = WSGIEnvironment = Any

__all__ = [
    "BASE_URL",
    "FACES",
    "Behaviour",
    "Executions",
    "Face",
    "SpyStore",
    "WSGIServer",
]

BASE_URL: Final = "http://test"
BOUND: Final = 10.0
"""A bound on every wait of the suite: it catches a hang, it does not time anything."""


# -- the app, described once ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """What the app does with a request, whatever its framework.

    It reads the whole body, records it and the key it was given, sets ``started``, waits on the test's gate if
    ``gated``, then answers ``status`` (or ``NNN`` for a path ``/status/NNN``) with ``headers`` and ``chunks`` (by
    default one JSON chunk naming the execution, so that a replay can be told from a second run; none for 204 and
    304). It raises ``raises`` on the executions numbered in ``raise_on`` (every one if empty), or says its outcome
    is unknown (``unknown``: ``"raise"`` OutcomeUnknownError or ``"mark"`` it and answer).

    ``style``: ``"list"`` (the whole body at once), ``"stream"`` (a generator: Django's StreamingHttpResponse,
    Flask's generator response), ``"write"`` (the WSGI ``write()`` callable: the WSGI face only) or
    ``"stream-then-raise"`` (one chunk, then the exception).
    """

    status: int = 200
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),)
    chunks: Sequence[bytes] | None = None
    raises: str | None = None
    raise_on: frozenset[int] = frozenset()
    unknown: str | None = None
    gated: bool = False
    style: str = "list"

    def status_for(self, path: str) -> int:
        if path.startswith("/status/"):
            return int(path.rsplit("/", 1)[1])
        return self.status


@dataclass
class Executions:
    """What the app saw, execution by execution: the side effect "exactly once" is about."""

    gate: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    bodies: list[bytes] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    closed: int = 0  # how many of the app's iterables were closed (the WSGI face's rows)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def wait_for_calls(self, count: int) -> None:
        """Return once *count* executions have started (and read their body)."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.calls >= count, timeout=BOUND), (self.calls, count)

    def run(self, behaviour: Behaviour, method: str, path: str, body: bytes, key: str | None) -> Response:
        """One execution: counted, gated, then the answer (or the exception) of *behaviour*."""
        with self.changed:
            self.calls += 1
            call = self.calls
            self.bodies.append(body)
            self.keys.append(key)
            self.changed.notify_all()
        if behaviour.gated:
            assert self.gate.wait(BOUND), "the test never opened the gate"
        status = behaviour.status_for(path)
        raising = behaviour.raises is not None and (not behaviour.raise_on or call in behaviour.raise_on)
        if raising and behaviour.style != "stream-then-raise":
            raise RuntimeError(behaviour.raises)
        if behaviour.unknown == "raise":
            msg = "the payment provider timed out after the charge was sent"
            raise OutcomeUnknownError(msg)
        if behaviour.unknown == "mark":
            mark_outcome_unknown()
        chunks = behaviour.chunks
        if chunks is None:
            document = {"call": call, "method": method, "path": path, "body": body.decode("utf-8", "replace")}
            chunks = [] if status in (204, 304) else [json.dumps(document).encode()]
        return Response(status, list(behaviour.headers), list(chunks), call)


@dataclass
class Response:
    """A neutral response: each face turns it into its framework's."""

    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes]
    call: int


def stream(behaviour: Behaviour, executions: Executions, response: Response) -> Iterator[bytes]:
    """The body of a streamed response, chunk by chunk (raising after the first, for ``stream-then-raise``)."""
    for index, chunk in enumerate(response.chunks):
        yield chunk
        if index == 0 and behaviour.style == "stream-then-raise" and behaviour.raises is not None:
            raise RuntimeError(behaviour.raises)


# -- the faces -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What a scenario configures, in neutral terms; each face spells it its own way."""

    policy: Mapping[str, Any] = field(default_factory=dict)  # Policy fields by name
    principal_header: str | None = None  # the principal is this request header's value
    fingerprint_by_path: bool = False  # the fingerprint is the path alone (the calls are recorded)


@dataclass
class Seen:
    """What the face's principal and fingerprint callables were called with."""

    principals: list[str] = field(default_factory=list)
    fingerprints: list[tuple[str, bytes]] = field(default_factory=list)


class Face:
    """One blocking face: builds, from a :class:`Behaviour`, an app of its framework behind idempo, as a WSGI callable.

    ``surfaces_exceptions``: whether an exception of the app reaches the server (the WSGI face), or the framework
    answers it with a 500 of its own (Django, Flask). ``has_write``: whether the app can use WSGI's ``write()``.
    ``has_fingerprint``: whether the face takes a custom fingerprint callable.
    """

    name = ""
    surfaces_exceptions = False
    has_write = False
    has_fingerprint = False

    def __repr__(self) -> str:
        return self.name

    def available(self) -> str | None:
        """Why this face cannot run here (its module is missing), or ``None``."""
        return None

    def serve(
        self, behaviour: Behaviour, executions: Executions, store: SyncStore, options: Options, seen: Seen
    ) -> contextlib.AbstractContextManager[WSGIApplication]:
        raise NotImplementedError


class WSGIFace(Face):
    """``idempo.wsgi.IdempotencyMiddleware`` around a plain WSGI app; the key is ``environ["idempo.key"]``."""

    name = "wsgi"
    surfaces_exceptions = True
    has_write = True
    has_fingerprint = True

    @contextlib.contextmanager
    def serve(
        self, behaviour: Behaviour, executions: Executions, store: SyncStore, options: Options, seen: Seen
    ) -> Iterator[WSGIApplication]:
        from idempo.wsgi import KEY_ENVIRON, IdempotencyMiddleware, request_path

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            response = executions.run(
                behaviour, environ["REQUEST_METHOD"], request_path(environ), body, environ.get(KEY_ENVIRON)
            )
            status = f"{response.status} X"
            if behaviour.style == "write":
                write = start_response(status, response.headers)
                for chunk in response.chunks:
                    write(chunk)
                return Closing([], executions)
            if behaviour.style in ("stream", "stream-then-raise"):

                def generate() -> Iterator[bytes]:
                    start_response(status, response.headers)
                    yield from stream(behaviour, executions, response)

                return Closing(generate(), executions)
            start_response(status, response.headers)
            return response.chunks  # a list: the common case (the whole body at once)

        kwargs: dict[str, Any] = dict(options.policy)
        if options.principal_header is not None:
            environ_name = "HTTP_" + options.principal_header.upper().replace("-", "_")

            def principal(environ: WSGIEnvironment) -> str:
                value: str = environ.get(environ_name, "")
                seen.principals.append(value)
                return value

            kwargs["principal"] = principal
        if options.fingerprint_by_path:

            def fingerprint(environ: WSGIEnvironment, body: bytes) -> str:
                path = request_path(environ)
                seen.fingerprints.append((path, body))
                return path

            kwargs["fingerprint"] = fingerprint
        yield IdempotencyMiddleware(app, store=store, **kwargs)


class Closing:
    """The app's iterable, which counts its ``close()`` (PEP 3333: the server always calls it)."""

    def __init__(self, chunks: Iterable[bytes], executions: Executions) -> None:
        self.chunks = chunks
        self.iterator = iter(chunks)
        self.executions = executions

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self.iterator)

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        with self.executions.lock:
            self.executions.closed += 1


def _upper(policy: Mapping[str, Any]) -> dict[str, Any]:
    return {name.upper(): value for name, value in policy.items()}


class DjangoFace(Face):
    """``idempo.django.IdempotencyMiddleware`` in the test project's ``MIDDLEWARE`` (after sessions and
    authentication), configured by ``settings.IDEMPO``, in front of one view (``tests.support.django_setup.
    django_app``, a ``WSGIHandler``). The key is ``request.idempotency_key``."""

    name = "django"
    has_fingerprint = True

    def available(self) -> str | None:
        for module in ("idempo.django", "tests.support.django_setup"):
            try:
                __import__(module)
            except ImportError as exc:
                return f"the Django face is missing: {module} ({exc})"
        return None

    @contextlib.contextmanager
    def serve(
        self, behaviour: Behaviour, executions: Executions, store: SyncStore, options: Options, seen: Seen
    ) -> Iterator[WSGIApplication]:
        from tests.support.django_setup import django_app, setup

        setup()
        from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
        from django.urls import re_path

        def view(request: HttpRequest) -> HttpResponseBase:
            key: str | None = getattr(request, "idempotency_key", "<absent>")
            response = executions.run(behaviour, request.method or "", request.path, request.body, key)
            made: HttpResponseBase
            if behaviour.style in ("stream", "stream-then-raise"):
                made = StreamingHttpResponse(stream(behaviour, executions, response), status=response.status)
            else:
                made = HttpResponse(b"".join(response.chunks), status=response.status)
            for name, value in _django_headers(response.headers):
                if name.lower() == "set-cookie":
                    made.cookies.load(value)
                else:
                    made.headers[name] = value
            return made

        kwargs: dict[str, Any] = {"store": store, **options.policy}
        if options.principal_header is not None:
            header = options.principal_header

            def principal(request: HttpRequest) -> str:
                value: str = request.headers.get(header, "")
                seen.principals.append(value)
                return value

            kwargs["principal"] = principal
        if options.fingerprint_by_path:

            def fingerprint(request: HttpRequest, body: bytes) -> str:
                path: str = request.path
                seen.fingerprints.append((path, body))
                return path

            kwargs["fingerprint"] = fingerprint
        # A urls module of this run's own (request.urlconf names it), removed at the end.
        name = f"tests.support._contract_urls_{id(executions)}"
        urls = types.ModuleType(name)
        urls.urlpatterns = [re_path(r"", view)]  # type: ignore[attr-defined]
        sys.modules[name] = urls
        try:
            yield django_app(name, **kwargs)
        finally:
            del sys.modules[name]


def _django_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Django's response headers are a dict: a repeated header's values are joined by commas (HTTP's own way of
    repeating a list-valued header); Set-Cookie headers stay apart (cookies)."""
    joined: dict[str, tuple[str, str]] = {}
    cookies: list[tuple[str, str]] = []
    for name, value in headers:
        if name.lower() == "set-cookie":
            cookies.append((name, value))
        elif name.lower() in joined:
            first, previous = joined[name.lower()]
            joined[name.lower()] = (first, f"{previous}, {value}")
        else:
            joined[name.lower()] = (name, value)
    return [*joined.values(), *cookies]


class FlaskFace(Face):
    """``idempo.flask.Idempotency(app, store=..., **options)`` on a Flask app of one view for every path
    (``tests.support.flask_setup.flask_app``: Flask's own 500 for an exception, as in production); the key is
    ``flask.g.idempotency_key``."""

    name = "flask"
    has_fingerprint = True

    def available(self) -> str | None:
        for module in ("idempo.flask", "tests.support.flask_setup"):
            try:
                __import__(module)
            except ImportError as exc:
                return f"the Flask face is missing: {module} ({exc})"
        return None

    @contextlib.contextmanager
    def serve(
        self, behaviour: Behaviour, executions: Executions, store: SyncStore, options: Options, seen: Seen
    ) -> Iterator[WSGIApplication]:
        import flask

        from tests.support.flask_setup import flask_app

        def view(path: str = "") -> flask.Response:
            request = flask.request
            key = flask.g.get("idempotency_key", "<absent>")
            response = executions.run(behaviour, request.method, request.path, request.get_data(), key)
            body: Iterable[bytes] = response.chunks
            if behaviour.style in ("stream", "stream-then-raise"):
                body = stream(behaviour, executions, response)
            made = flask.Response(body, status=response.status)
            made.headers.clear()
            for name, value in response.headers:
                made.headers.add(name, value)
            return made

        kwargs: dict[str, Any] = {"store": store, **options.policy}
        if options.principal_header is not None:
            header = options.principal_header

            def principal(request: flask.Request) -> str:
                value = request.headers.get(header, "")
                seen.principals.append(value)
                return value

            kwargs["principal"] = principal
        if options.fingerprint_by_path:

            def fingerprint(request: flask.Request, body: bytes) -> str:
                seen.fingerprints.append((request.path, body))
                return request.path

            kwargs["fingerprint"] = fingerprint
        yield flask_app({"/": view, "/<path:path>": view}, **kwargs)


FACES: Final = (WSGIFace(), DjangoFace(), FlaskFace())


# -- the server ------------------------------------------------------------------------------------------------------


class WSGIServer(httpx.BaseTransport):
    """Calls a WSGI application as a server does, in the client's thread.

    Repeated request headers reach the app joined by commas (as gunicorn does). With *chunked*, the body has no
    ``Content-Length`` and ``wsgi.input_terminated`` is set (gunicorn, uWSGI). ``write()`` data goes out before the
    iterable's. With *leave_after*, the client leaves after that many chunks of the body: the server stops reading.
    The iterable is always closed. An exception of the app reaches the client.
    """

    def __init__(self, app: WSGIApplication, *, chunked: bool = False, leave_after: int | None = None) -> None:
        self.app = app
        self.chunked = chunked
        self.leave_after = leave_after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": request.url.scheme,
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": request.url.path,
            "QUERY_STRING": request.url.query.decode("ascii"),
            "SERVER_NAME": request.url.host,
            "SERVER_PORT": str(request.url.port or 80),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
        }
        for raw_name, raw_value in request.headers.raw:
            name = raw_name.decode("latin-1").upper().replace("-", "_")
            if name == "CONTENT_LENGTH" and self.chunked:
                continue
            if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                name = "HTTP_" + name
            value = raw_value.decode("latin-1")
            environ[name] = f"{environ[name]},{value}" if name in environ else value
        if self.chunked:
            environ["wsgi.input_terminated"] = True
        head: list[tuple[str, list[tuple[str, str]]]] = []
        sent: list[bytes] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info is not None and exc_info[0] is not None and sent:
                raise exc_info[1].with_traceback(exc_info[2])
            head[:] = [(status, headers)]
            return write

        def write(data: bytes) -> None:
            assert head, "write() before start_response"
            sent.append(data)

        result = self.app(environ, start_response)
        try:
            count = 0
            for chunk in result:
                if chunk:
                    assert head, "a body chunk before start_response"
                    sent.append(chunk)
                    count += 1
                if self.leave_after is not None and count >= self.leave_after:
                    break  # the client left: the server stops reading, and closes
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        assert head, "the app never called start_response"
        status, headers = head[0]
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        # A stream, not content=: httpx would add a Content-Length the server did not send.
        return httpx.Response(int(status[:3]), headers=raw, stream=httpx.ByteStream(b"".join(sent)))


# -- the store -------------------------------------------------------------------------------------------------------


class SpyStore:
    """A user-written ``SyncStore`` that hands every call to *inner* (one of our real stores), counting claims and
    renewals; the operations in *fail_on* raise ``StoreError`` instead (all of them with ``fail_on="all"``), as a
    backend that went away does, and completes larger than *full_above* bytes raise ``StoreFullError``, as Redis at
    ``maxmemory`` does."""

    def __init__(self, inner: SyncStore, *, fail_on: Iterable[str] | str = (), full_above: int | None = None) -> None:
        self.inner = inner
        self.fail_on = frozenset(fail_on) if not isinstance(fail_on, str) else frozenset({fail_on})
        self.full_above = full_above
        self.calls: list[str] = []
        self.tokens: list[str] = []
        self.claims = 0
        self.renewals = 0
        self.refused = 0
        self.changed = threading.Condition()

    def __repr__(self) -> str:
        return f"SpyStore({self.inner!r})"

    def _check(self, operation: str) -> None:
        self.calls.append(operation)
        if "all" in self.fail_on or operation in self.fail_on:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as exc:
                msg = f"backend unreachable during {operation}"
                raise StoreError(msg) from exc

    def wait_for(self, what: str, count: int) -> None:
        """Return once *what* (``"claims"`` or ``"renewals"``) reached *count*."""
        with self.changed:
            assert self.changed.wait_for(lambda: getattr(self, what) >= count, timeout=BOUND), (what, count)

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self._check("claim")
        result = self.inner.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)
        with self.changed:
            self.claims += 1
            token_of = getattr(result, "token", None)
            if token_of is not None:
                self.tokens.append(token_of)
            self.changed.notify_all()
        return result

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        self._check("renew")
        owned = self.inner.renew(key, token, lease=lease)
        with self.changed:
            self.renewals += 1
            self.changed.notify_all()
        return owned

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self._check("complete")
        if self.full_above is not None and len(payload) > self.full_above:
            self.refused += 1
            msg = "OOM command not allowed when used memory > 'maxmemory'"
            raise StoreFullError(msg)
        return self.inner.complete(key, token, payload, ttl=ttl)

    def release(self, key: str, token: str) -> bool:
        self._check("release")
        return self.inner.release(key, token)

    def get(self, key: str) -> Record | None:
        self._check("get")
        return self.inner.get(key)

    def delete(self, key: str) -> bool:
        self._check("delete")
        return self.inner.delete(key)

    def purge_expired(self) -> int:
        self._check("purge_expired")
        return self.inner.purge_expired()

    def close(self) -> None:
        self.inner.close()
