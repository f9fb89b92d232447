"""``IdempotencyMiddleware`` for Django: the HTTP contract of idempo for Django views and Django REST framework, under
a WSGI server (gunicorn, uWSGI, mod_wsgi) or Django's ASGI handler.

It is :mod:`idempo.wsgi`'s twin at Django's level: the same blocking driver (one keyed request's store
conversation and response capture, written once for every blocking face), the same answers (the decision table's,
:mod:`idempo._core.decide`), configured from ``settings.IDEMPO``::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "idempo.django.IdempotencyMiddleware",  # after authentication: its principal is the logged-in user
        ...,
    ]
    IDEMPO = {"STORE": "redis://127.0.0.1:6379/0", "TTL": 24 * 3600}

For one keyed request (``POST``, ``PUT``, ``PATCH``, ``DELETE`` by default) it parses the key (400), reads the body
(413 over ``MAX_REQUEST_BYTES``; Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE`` still applies), claims the key under the
principal's namespace (a replay, 409, 422, 410 or 503 is answered at once, the view never called), runs the view
with the key in ``request.idempotency_key`` while one thread per process renews the leases, and records the
response before it leaves (a streaming one before its last chunk). A 5xx, or an exception, releases the key; a view
that raises :class:`~idempo.OutcomeUnknownError` (or calls :func:`~idempo.mark_outcome_unknown`) keeps it, and
its 500 becomes the 503 ``outcome-unknown`` problem.

The middleware is synchronous (``sync_capable``, not ``async_capable``): under Django's ASGI handler, Django runs it
in a thread of the request's own (``sync_to_async``), and the context (the outcome report a view marks) follows the
request across Django's adapters; the middleware starts no event loop.

Settings (``settings.IDEMPO``, a dict, read when the middleware is built: once per process, at the first request
under ``runserver`` and the test client, and at start-up under ASGI and WSGI servers):

``"STORE"`` (required)
    A store URL (:func:`~idempo.sync_store_from_url`), a :class:`~idempo.SyncStore`, a built-in async store, or
    ``"django:<alias>"``: a store keeping its records in that Django database (PostgreSQL or a SQLite file; see
    :func:`idempo.transactions.store_for`), e.g. ``"django:default"`` or ``"django:default?table=idempo_records"``.
``"ATOMIC"``
    ``True`` (the default with a ``"django:<alias>"`` store; refused with any other store): each keyed request runs
    the rest of the chain (the view) inside ``transaction.atomic(using=alias)``, and its response is recorded in
    that transaction, just before it commits: the view's rows and the completed key commit together, or neither
    does, so that a crash after the commit leaves the retry a replay, never a second run. ``False``: the store is
    used as any other.
``"PRINCIPAL"``
    A callable ``(request) -> str | bytes``, or its dotted path: who is asking; records are namespaced by its digest.
    Defaults to :func:`default_principal`. It may raise :class:`~idempo.RequestError` to refuse a request (400).
``"FINGERPRINT"``
    A callable ``(request, body: bytes) -> str``, or its dotted path. Defaults to SHA-256 over method, path, raw
    query string, the body's media type and the body.
``"OBSERVER"``
    An :class:`~idempo.observe.Observer`, or the dotted path of one (a class is instantiated without arguments).
``"TTL"``, ``"LEASE"``, ``"METHODS"``, ``"REQUIRE_KEY"``, ``"ON_CONFLICT"``, ...
    Every field of :class:`~idempo.Policy`, by its name in upper case.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from ._core.errors import ConfigurationError, OutcomeUnknownError, RequestError
from ._core.extras import require
from ._core.policy import Policy
from ._core.principal import principal_of
from ._sync.guard import Answer, FailOpen, Guard, Held
from ._sync.stores import check_at_start, check_store, sync_store
from .observe import Observer
from .stores import SyncStore
from .transactions import record_django, store_for

require("django", extra="django")

from asgiref.sync import async_to_sync  # noqa: E402 - Django's own dependency, there once Django is
from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.http import HttpRequest, HttpResponse, HttpResponseBase  # noqa: E402
from django.utils.functional import LazyObject, empty  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402

__all__ = ["IdempotencyMiddleware", "authorization_principal", "default_principal"]

_HELD: Final = "_idempo_held"  # the request's attribute where process_exception finds its claim
_RAISED: Final = "_idempo_raised"  # set by process_exception: the view raised
_OWN_SETTINGS: Final = ("STORE", "ATOMIC", "PRINCIPAL", "FINGERPRINT", "OBSERVER")
_POLICY_SETTINGS: Final = {option.name.upper(): option.name for option in dataclasses.fields(Policy)}
_DATABASE: Final = "django:"  # "STORE": "django:<alias>", a store on that Django database
# The query options of a "django:<alias>" store, by the database's vendor: the store's own (as in its URLs).
_STORE_OPTIONS: Final[Mapping[str, Mapping[str, Callable[[str], object]]]] = {
    "sqlite": {"table": str, "busy_timeout": float, "synchronous": str},
    "postgresql": {
        "table": str,
        "statement_timeout": float,
        "connect_timeout": float,
        "pool_timeout": float,
        "reconnect_timeout": float,
        "min_size": int,
        "max_size": int,
    },
}

logger = logging.getLogger("idempo")
_warned_nested: set[str] = set()  # the aliases whose nested transaction was warned of, once per process


def authorization_principal(request: HttpRequest) -> bytes:
    """The principal of the request's ``Authorization`` header (``b""`` when there is none)."""
    return principal_of(None, _authorization(request))


def default_principal(request: HttpRequest) -> bytes:
    """The default principal: the authenticated ``request.user`` (``AuthenticationMiddleware`` must run before the
    middleware; the user's class and ``pk`` name it), else the ``Authorization`` header (Django REST framework's
    token and basic authentication happen in the view, after the middleware: their credentials are the principal),
    else ``b""``, which every anonymous caller shares (the middleware warns once)."""
    return principal_of(_user(request), _authorization(request))


def _user(request: HttpRequest) -> object:
    """``request.user``, unwrapped from the ``SimpleLazyObject`` ``AuthenticationMiddleware`` leaves there (so that
    the user's own class names it), or ``None`` without that middleware."""
    user = getattr(request, "user", None)
    if isinstance(user, LazyObject):
        if user._wrapped is empty:
            user._setup()
        user = user._wrapped
    return user


def _authorization(request: HttpRequest) -> tuple[bytes, ...]:
    value = request.META.get("HTTP_AUTHORIZATION")
    return () if value is None else (_raw(value),)


def _raw(value: str) -> bytes:
    """A header or query string of ``request.META`` as the client sent it: the latin-1 of PEP 3333 under WSGI; UTF-8
    under Django's ASGI handler, which decodes the query string so."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def _database_store(setting: str) -> tuple[str, SyncStore]:
    """The alias ``"django:<alias>?options"`` names, and a store on that database (:func:`~idempo.transactions.
    store_for`, its own connections), with the query's options.

    Raises:
        ImproperlyConfigured: no such alias in ``settings.DATABASES``, an option the store does not take, or a
            database that cannot hold the records (neither PostgreSQL nor a SQLite file).
    """
    alias, _, query = setting.removeprefix(_DATABASE).partition("?")
    databases = getattr(settings, "DATABASES", {})
    if alias not in databases:
        msg = (
            f"settings.IDEMPO['STORE'] = {setting!r}: there is no database {alias!r} in settings.DATABASES (known: "
            f"{', '.join(databases) or 'none'})"
        )
        raise ImproperlyConfigured(msg)
    connection = connections[alias]  # no round trip: the store reads its settings
    known = _STORE_OPTIONS.get(connection.vendor, {})
    options: dict[str, object] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        convert = known.get(name)
        if convert is None:
            msg = (
                f"settings.IDEMPO['STORE'] = {setting!r}: {name!r} is not an option of a store on a "
                f"{connection.vendor} database (known: {', '.join(known) or 'none'})"
            )
            raise ImproperlyConfigured(msg)
        try:
            options[name] = convert(value)
        except ValueError:
            msg = f"settings.IDEMPO['STORE'] = {setting!r}: {name}={value!r} is not a {convert.__name__}"
            raise ImproperlyConfigured(msg) from None
    try:
        store = store_for(connection, sync=True, **options)
    except ConfigurationError as exc:
        msg = f"settings.IDEMPO['STORE'] = {setting!r}: {exc}"
        raise ImproperlyConfigured(msg) from exc
    return alias, sync_store(store)


def _callable(config: Mapping[str, Any], name: str) -> Any:
    value = config.get(name)
    if isinstance(value, str):
        try:
            value = import_string(value)
        except ImportError as exc:
            msg = f"settings.IDEMPO[{name!r}]: cannot import {value!r} ({exc})"
            raise ImproperlyConfigured(msg) from exc
    if value is not None and not callable(value):
        msg = f"settings.IDEMPO[{name!r}] must be a callable or its dotted path, not {value!r}"
        raise ImproperlyConfigured(msg)
    return value


class IdempotencyMiddleware:
    """Run each keyed POST, PUT, PATCH or DELETE of a Django project once, and replay its response to every retry.

    Add ``"idempo.django.IdempotencyMiddleware"`` to ``settings.MIDDLEWARE`` after ``AuthenticationMiddleware`` and
    configure it in ``settings.IDEMPO`` (see :mod:`idempo.django`).

    Raises:
        ImproperlyConfigured: ``settings.IDEMPO`` is missing, lacks ``"STORE"``, holds an unknown key, an option out
            of its range, a bad store URL, a ``"django:<alias>"`` store on no such database (or on one that cannot
            hold the records), ``"ATOMIC": True`` with a store that is not on a Django database, or a dotted path
            that does not import.
        StoreError: the store does not answer when the middleware is built (``"STARTUP_CHECK": "fail"``, the
            default: the worker does not boot; ``"warn"`` logs it and goes on, ``"off"`` does not ask).
    """

    sync_capable = True
    async_capable = False  # Django runs it in a thread under its ASGI handler

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        config = getattr(settings, "IDEMPO", None)
        if not isinstance(config, Mapping):
            msg = (
                "settings.IDEMPO must be a dict with at least a store, e.g. IDEMPO = {'STORE': 'sqlite:///idempo.db'}"
                f", not {config!r}"
            )
            raise ImproperlyConfigured(msg)
        unknown = sorted(str(name) for name in config if name not in _OWN_SETTINGS and name not in _POLICY_SETTINGS)
        if unknown:
            known = ", ".join((*_OWN_SETTINGS, *_POLICY_SETTINGS))
            msg = f"settings.IDEMPO has unknown keys: {', '.join(unknown)} (known: {known})"
            raise ImproperlyConfigured(msg)
        if config.get("STORE") is None:
            msg = "settings.IDEMPO['STORE'] is required: a store URL (e.g. 'redis://127.0.0.1:6379/0') or a store"
            raise ImproperlyConfigured(msg)
        options = {_POLICY_SETTINGS[name]: value for name, value in config.items() if name in _POLICY_SETTINGS}
        setting = config["STORE"]
        alias: str | None = None
        try:
            self.policy = Policy(**options)
            if isinstance(setting, str) and setting.startswith(_DATABASE):
                alias, self.store = _database_store(setting)
            else:
                self.store = sync_store(setting)
        except ConfigurationError as exc:
            msg = f"settings.IDEMPO: {exc}"
            raise ImproperlyConfigured(msg) from exc
        atomic = config.get("ATOMIC", alias is not None)
        if not isinstance(atomic, bool):
            msg = f"settings.IDEMPO['ATOMIC'] must be True or False, not {atomic!r}"
            raise ImproperlyConfigured(msg)
        if atomic and alias is None:
            msg = (
                "settings.IDEMPO['ATOMIC'] = True needs the store in the Django database the views write to, e.g. "
                f"'STORE': 'django:default', so that their transaction can record the response; the store is "
                f"{self.store!r}, which cannot take part in it"
            )
            raise ImproperlyConfigured(msg)
        self.database: str | None = alias if atomic else None
        """The alias of the database whose transaction each keyed request runs in (``"ATOMIC"``), or ``None``."""
        self.principal: Callable[[HttpRequest], str | bytes] = _callable(config, "PRINCIPAL") or default_principal
        self.fingerprint: Callable[[HttpRequest, bytes], str] | None = _callable(config, "FINGERPRINT")
        observer = config.get("OBSERVER")
        if isinstance(observer, str):
            observer = _callable(config, "OBSERVER")
            if isinstance(observer, type):
                observer = observer()
        self.observer: Observer | None = observer
        self.get_response = get_response
        self.guard = Guard(self.store, self.policy, observer)
        self._meta_key = "HTTP_" + self.policy.header.upper().replace("-", "_")
        check_at_start(self.store, self.policy)

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        guard = self.guard
        request.idempotency_key = None
        method = request.method
        if method not in guard.methods:
            return self._pass(request)
        path = request.path
        admitted = guard.admit(request.META.get(self._meta_key), path)
        if admitted is None:
            return self._pass(request)
        if isinstance(admitted, Answer):
            return _send(guard, request, admitted)
        body = _read_body(guard, request)
        if isinstance(body, Answer):
            return _send(guard, request, body)
        try:
            principal = self.principal(request)
        except RequestError as exc:
            return _send(guard, request, guard.refuse("bad_key", exc))
        if self.principal is default_principal:
            guard.warn_anonymous(principal)
        if self.fingerprint is not None:
            fingerprint = self.fingerprint(request, body)
        else:
            meta = request.META
            query = _raw(meta.get("QUERY_STRING", ""))
            content_type = _raw(meta.get("CONTENT_TYPE", ""))
            fingerprint = guard.fingerprint(method, path, query, content_type, body)
        claimed = guard.claim(admitted, principal, fingerprint)
        if isinstance(claimed, Answer):
            return _send(guard, request, claimed)
        request.idempotency_key = admitted
        if isinstance(claimed, FailOpen):
            guard.observe("store_error", request.META)
            return self.get_response(request)
        guard.observe("executed", request.META)
        return self._run(request, claimed)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Django's hook for a view's exception (which it then turns into a response before this middleware sees
        it): an :class:`~idempo.OutcomeUnknownError` marks the request's outcome unknown, so that its 500 becomes the
        503 ``outcome-unknown`` problem and its key is kept. Any other exception that ends in a 5xx is the failure of
        an exception, and releases the key even with ``store_server_errors`` (which keeps the app's own 5xx
        answers); one Django turns into a 4xx (``Http404``, ``PermissionDenied``) is the app's answer, kept."""
        held: Held | None = getattr(request, _HELD, None)
        if held is None:
            return
        if isinstance(exception, OutcomeUnknownError):
            held.mark_unknown()
        setattr(request, _RAISED, True)  # and under "ATOMIC", the view's writes roll back

    def check_store(self) -> None:
        """Ask the store once (a ``get``), as the start-up check does when the middleware is built; e.g. for a
        readiness probe.

        Raises:
            StoreError: the store does not answer, or fails (the driver's exception is ``__cause__``).
        """
        check_store(self.store)

    def _pass(self, request: HttpRequest) -> HttpResponseBase:
        self.guard.observe("passthrough", request.META)
        return self.get_response(request)

    def _run(self, request: HttpRequest, held: Held) -> HttpResponseBase:
        """Run the view under the claim, and record its response before it leaves."""
        guard = self.guard
        setattr(request, _HELD, held)
        held.enter(head=request.method == "HEAD")
        try:
            if self.database is None:
                response = self.get_response(request)
            else:
                response = self._atomic(request, held, self.database)
        except OutcomeUnknownError:  # it escaped Django's own handling (DEBUG_PROPAGATE_EXCEPTIONS)
            held.mark_unknown()
            held.finish(failed=True)
            return _send(guard, request, guard.unknown())
        except BaseException:
            held.finish(failed=True)
            raise
        finally:
            held.leave()
            delattr(request, _HELD)
        head = request.method == "HEAD"
        if response.status_code >= 500 and getattr(request, _RAISED, False) and not held.unknown:  # an exception's
            held.finish(failed=True)  # 5xx: released
            return response
        if not held.start(response.status_code, _headers(response)):  # the 500 of an unknown outcome
            held.finish(failed=True)
            response.close()
            return _send(guard, request, guard.unknown())
        if not response.streaming:
            held.chunk(response.content)
            held.finish(head=head)
            return response
        if response.is_async:  # an async iterator: Django buffers it for a sync consumer too; so do we, recorded
            chunks: Iterable[bytes] = async_to_sync(_collect)(response.streaming_content)
        else:
            chunks = response.streaming_content
        stream = held.stream(chunks, head=head)
        closers: list[Callable[[], object]] = response._resource_closers
        response.streaming_content = stream
        # Django runs the closers in order: the stream's (which reads and records the rest of a response the client
        # left, then closes) must come before the view's iterator or file is closed.
        closers.remove(stream.close)
        closers.insert(0, stream.close)
        return response

    def _atomic(self, request: HttpRequest, held: Held, alias: str) -> HttpResponseBase:
        """The rest of the chain (the view) inside ``transaction.atomic(using=alias)``, its response recorded in that
        transaction just before it commits (Django's ``on_commit`` then tells the claim, and :meth:`Held.finish`
        makes no store call): the view's rows and the completed key commit together, or neither does.

        As with ``ATOMIC_REQUESTS``: an exception in the view (which Django turns into a response before it gets
        here; ``process_exception`` marks it) rolls the transaction back, and the key is then released or kept by
        the usual path; a response the view returns commits, a 5xx too (not recorded: its key is released after). A
        streaming response commits without its record (its body is not known yet), which the usual path writes as
        it streams. Inside a transaction opened before this middleware (another middleware's, a ``TestCase``'s),
        the block is a savepoint and records nothing: the outer transaction would commit after the response left,
        and the usual path writes the record then, on the store's own connections.

        Raises:
            KeyTakenOverError: the key was taken over (this request's lease ran out) before the transaction
                committed: it rolled back, and Django answers 500.
        """
        connection = connections[alias]
        nested = connection.in_atomic_block
        if nested and alias not in _warned_nested:
            _warned_nested.add(alias)
            logger.warning(
                "idempo: a keyed request reached the middleware inside a transaction already open on database %r (a "
                "middleware listed before idempo's, or a TestCase): its response is recorded after the request, "
                "not in that transaction, and a crash in between may run it twice",
                alias,
            )
        with transaction.atomic(using=alias):
            response = self.get_response(request)
            if getattr(request, _RAISED, False):  # the view raised: its writes roll back
                transaction.set_rollback(True, using=alias)
            elif not nested and not response.streaming:
                report = held.report
                if report is not None and report.bound is not None:
                    # The middleware's own view of the response (its cookies as Set-Cookie headers), as recorded
                    # without a transaction.
                    parts = (response.status_code, _headers(response), response.content)
                    record_django(report.bound, connection, parts)
        return response


def _read_body(guard: Guard, request: HttpRequest) -> bytes | Answer:
    """The whole body, bounded by ``max_request_bytes``: a declared ``Content-Length`` over it is refused before a
    byte is read; a body without one (Django's ASGI handler reads chunked bodies) after."""
    declared = request.META.get("CONTENT_LENGTH", "")
    if declared and declared.strip().isdigit():
        too_large = guard.too_large(int(declared), declared=True)
        if too_large is not None:
            return too_large
    body: bytes = request.body
    return guard.too_large(len(body), declared=False) or body


async def _collect(chunks: AsyncIterable[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


def _headers(response: HttpResponseBase) -> list[tuple[bytes, bytes]]:
    """The response's headers as a server sends them, its cookies as ``Set-Cookie`` headers (which the record drops
    unless ``replay_set_cookie``)."""
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.items()]
    headers.extend(
        (b"Set-Cookie", cookie.output(header="").strip().encode("latin-1")) for cookie in response.cookies.values()
    )
    return headers


def _send(guard: Guard, request: HttpRequest, answer: Answer) -> HttpResponse:
    """*answer* (a replay or a problem) as a Django response, its body byte for byte."""
    guard.observe(answer.outcome, request.META)
    response = HttpResponse(answer.body, status=answer.status)
    del response.headers["Content-Type"]  # Django's default; the answer's own, if any, follows
    for raw_name, raw_value in answer.headers:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name.lower() == "set-cookie":  # replayed only with replay_set_cookie
            response.cookies.load(value)
        elif name in response.headers:  # a repeated header: one line, its values joined (RFC 9110, 5.3)
            response.headers[name] = f"{response.headers[name]}, {value}"
        else:
            response.headers[name] = value
    return response
