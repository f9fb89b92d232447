"""``Idempotency``, the Flask extension: the HTTP contract of idempo for a Flask application, inside its request
context (``flask.session``, ``flask.g`` and Flask-Login's ``current_user`` work in the principal).

::

    app = Flask(__name__)
    app.config["IDEMPO_STORE"] = "sqlite:///idempo.db"
    idempotency = Idempotency(app)  # or Idempotency() at import time, and idempotency.init_app(app) in a factory

It is the WSGI face's driver (:mod:`idempo._sync`: the same decisions, the same store conversation, the same
capture of the response) run from Flask's request hooks, not around the WSGI callable, so that the principal is
taken inside the request context:

- a ``before_request`` hook, registered when :meth:`Idempotency.init_app` runs (hooks run in registration order:
  those registered before it run before it, e.g. one that loads the user), admits the request (400 for a bad key,
  413 for a body over ``max_request_bytes``), fingerprints it and claims the key. It reads the body from the WSGI
  input (bounded, as :mod:`idempo.wsgi` does) and hands it back for the view to read: a hook that runs before it
  must not read the body. A replay or a problem (409, 422,
  410, 503) is returned from the hook, so the view does not run; the key goes to ``flask.g.idempotency_key``.
- an ``after_request`` hook placed **first** in the app's list, so that Flask, which runs them in reverse order,
  runs it **last**: it records the final response, with what the app's other ``after_request`` hooks (and the
  blueprints') added to it. A replay or a problem returned by the ``before_request`` hook passes through the other
  hooks as any response does (their CORS or security headers are added to it), and is not recorded again. The
  session's cookie is written after every hook, so it is not recorded (``Set-Cookie`` is never replayed anyway).
  A streamed response (``response.is_streamed``) has its iterable wrapped: it is recorded as the server sends it,
  and the outcome is recorded before its last chunk goes (:class:`~idempo._sync.guard.RecordedStream`).
- an error handler for :class:`~idempo.OutcomeUnknownError`: raised by a keyed request's view, it answers the 503
  ``outcome-unknown`` problem and keeps the key (never Flask's 500), with ``PROPAGATE_EXCEPTIONS`` too.
- a receiver of Flask's ``got_request_exception`` signal, sent when an exception escapes the view, before Flask
  answers its 500 (through the ``after_request`` hooks) or re-raises it (``PROPAGATE_EXCEPTIONS``, in testing and
  debug): it releases the key then, so that the 500 is not recorded even with ``store_server_errors``.
- a ``teardown_request`` hook, which releases a key still claimed when the request ends (an exception Flask does not
  handle: ``KeyboardInterrupt``, a worker's exit).

Wrapping ``app.wsgi_app`` with :class:`idempo.wsgi.IdempotencyMiddleware` works too, but runs outside the request
context: its principal sees the WSGI environ only.
"""

from __future__ import annotations

import dataclasses
import pkgutil
import weakref
from collections.abc import Callable, Iterable
from typing import Final, Unpack, cast

from ._core.errors import ConfigurationError, OutcomeUnknownError, RequestError
from ._core.extras import require
from ._core.policy import Policy, PolicyOptions
from ._core.principal import principal_of

# Imported after the check, so that a missing extra says what to install.
require("flask", extra="flask")

from flask import Flask, Request, Response, current_app, g, got_request_exception, has_app_context, request  # noqa: E402
from werkzeug.datastructures import Headers  # noqa: E402

from ._sync.environ import authorization, give_body, read_body, request_path  # noqa: E402
from ._sync.guard import Answer, FailOpen, Guard, Held  # noqa: E402
from ._sync.stores import check_at_start, check_store, sync_store  # noqa: E402
from .observe import Observer  # noqa: E402
from .stores import Store, SyncStore  # noqa: E402

__all__ = ["CONFIG_PREFIX", "EXTENSION", "Idempotency", "default_principal"]

CONFIG_PREFIX: Final = "IDEMPO_"
"""The prefix of the extension's keys in ``app.config``: ``IDEMPO_STORE``, ``IDEMPO_PRINCIPAL``, and each field of
:class:`~idempo.Policy` in upper case (``IDEMPO_TTL``, ``IDEMPO_LEASE``, ``IDEMPO_METHODS``, ...)."""

EXTENSION: Final = "idempo"
"""The key of the extension in ``app.extensions``."""

_HELD: Final = "_idempo_held"  # the attribute of flask.g that holds the request's claim while the app runs
_UNKNOWN: Final = "_idempo_unknown"  # the guard of a request whose exception said its outcome is unknown
_POLICY_KEYS: Final = {CONFIG_PREFIX + field.name.upper(): field.name for field in dataclasses.fields(Policy)}
_OWN_KEYS: Final = frozenset({"IDEMPO_STORE", "IDEMPO_PRINCIPAL", *_POLICY_KEYS})

Principal = Callable[[Request], str | bytes]
Fingerprint = Callable[[Request, bytes], str]


def default_principal(request: Request) -> bytes:
    """The default principal: the request's one ``Authorization`` header, else ``b""``, which every anonymous caller
    shares (the extension warns once). Behind cookie sessions, pass ``principal=`` (e.g. the session's user id).

    Raises:
        RequestError: more than one ``Authorization`` header (400).
    """
    return principal_of(None, authorization(request.environ))


class Idempotency:
    """Run each keyed POST, PUT, PATCH or DELETE of a Flask application once, and replay its response to every retry.

    ``Idempotency(app, store="sqlite:///idempo.db")``, or ``idempotency = Idempotency()`` then
    ``idempotency.init_app(app)`` in an application factory. Every argument left out is read from ``app.config``
    when :meth:`init_app` runs (``IDEMPO_STORE``, ``IDEMPO_PRINCIPAL``, ``IDEMPO_TTL``, ...: :data:`CONFIG_PREFIX`);
    arguments win over the configuration. The view finds the key in ``flask.g.idempotency_key`` (``None`` on every
    request let through without one).

    Args:
        app: the application, or ``None`` to call :meth:`init_app` later.
        store: a :class:`~idempo.SyncStore`, an async store with a ``.sync()`` twin (every built-in one), or a store
            URL for :func:`~idempo.sync_store_from_url` (config: ``IDEMPO_STORE``). Required, here or there.
        policy: the contract's options as one :class:`~idempo.Policy`; given, it replaces the ``IDEMPO_<FIELD>``
            keys of the configuration (the keyword *options* still change it).
        principal: who is asking: a function of the :class:`flask.Request`, called inside the request context, so it
            may read ``flask.session``, ``flask.g`` or ``current_user`` (config: ``IDEMPO_PRINCIPAL``, a callable or
            its dotted path, ``"myapp.auth:principal"``). Records are namespaced by its digest. It may raise
            :class:`~idempo.RequestError` to refuse a request (400). Defaults to :func:`default_principal`.
        fingerprint: a function of ``(request, body)`` that digests what the request asks for. Defaults to SHA-256
            over method, path, raw query string, the body's media type and the body, as the WSGI middleware's.
        observer: told of each request's outcome (with the WSGI environ) and of each store call's time.
        **options: any field of :class:`~idempo.Policy`, by name.

    Raises:
        ConfigurationError: no store, an option out of its range or unknown (an ``IDEMPO_`` key of the configuration
            that is not one), a principal that is not callable, a bad store URL.
        StoreError: the store does not answer when :meth:`init_app` runs (``startup_check="fail"``, the default).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        store: SyncStore | Store | str | None = None,
        policy: Policy | None = None,
        principal: Principal | str | None = None,
        fingerprint: Fingerprint | None = None,
        observer: Observer | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        self._store_arg = store
        self._policy_arg = policy
        self._principal_arg = principal
        self._options = dict(options)
        self.fingerprint = fingerprint
        self.observer = observer
        self.app: Flask | None = None
        self._faces: weakref.WeakKeyDictionary[Flask, _Face] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Protect *app*: read its configuration, open the store, run the start-up check, and register the hooks.

        One extension may protect several applications, each with its own configuration.

        Raises:
            ConfigurationError: as for the class.
            StoreError: the store does not answer (``startup_check="fail"``): the worker does not boot.
        """
        config = app.config
        unknown = sorted(name for name in config if name.startswith(CONFIG_PREFIX) and name not in _OWN_KEYS)
        if unknown:
            msg = f"unknown idempo configuration {', '.join(unknown)}; known: {', '.join(sorted(_OWN_KEYS))}"
            raise ConfigurationError(msg)
        store = self._store_arg if self._store_arg is not None else config.get("IDEMPO_STORE")
        if store is None:
            msg = (
                "idempo needs a store: pass Idempotency(app, store=...) or set app.config['IDEMPO_STORE'] "
                "(a URL such as 'sqlite:///idempo.db' or 'redis://127.0.0.1:6379/0', or a SyncStore)"
            )
            raise ConfigurationError(msg)
        given = self._principal_arg
        principal = _principal(given if given is not None else config.get("IDEMPO_PRINCIPAL"))
        try:
            if self._policy_arg is not None:
                policy = self._policy_arg.with_options(**self._options)
            else:
                from_config = {name: config[key] for key, name in _POLICY_KEYS.items() if key in config}
                policy = Policy(**{**from_config, **self._options})
        except TypeError as exc:  # an option that is not one
            raise ConfigurationError(str(exc)) from exc
        sync = sync_store(store)
        guard = Guard(sync, policy, self.observer)
        check_at_start(sync, policy)
        face = _Face(guard, principal, self.fingerprint)
        app.before_request(face.before_request)
        # Flask runs after_request hooks in reverse order: the first one registered runs last, on the final response.
        app.after_request_funcs.setdefault(None, []).insert(0, face.after_request)
        app.teardown_request(face.teardown_request)
        app.register_error_handler(OutcomeUnknownError, face.outcome_unknown)
        got_request_exception.connect(face.request_failed, app)
        app.extensions[EXTENSION] = self
        self._faces[app] = face
        self.app = app

    @property
    def guard(self) -> Guard:
        """The guard of the current application (in an application context), else of the last one initialised."""
        app: Flask | None = current_app._get_current_object() if has_app_context() else self.app  # type: ignore[attr-defined]
        face = self._faces.get(app) if app is not None else None
        if face is None:
            msg = "this Idempotency was not initialised for the application: call init_app(app)"
            raise ConfigurationError(msg)
        return face.guard

    @property
    def policy(self) -> Policy:
        """The policy of the current application (as :attr:`guard`)."""
        return self.guard.policy

    @property
    def store(self) -> SyncStore:
        """The store of the current application (as :attr:`guard`)."""
        return self.guard.store

    def check_store(self) -> None:
        """Ask the store once (a ``get``), as the start-up check does in :meth:`init_app`; e.g. for a readiness probe.

        Raises:
            StoreError: the store does not answer, or fails (the driver's exception is ``__cause__``).
        """
        check_store(self.store)


def _principal(value: object) -> Principal:
    """The principal function *value* names: ``None`` (the default), a callable, or a dotted path to one."""
    if value is None:
        return default_principal
    if isinstance(value, str):
        try:
            value = pkgutil.resolve_name(value)
        except (ImportError, AttributeError, ValueError) as exc:
            msg = f"IDEMPO_PRINCIPAL {value!r} cannot be imported: {exc}"
            raise ConfigurationError(msg) from exc
    if not callable(value):
        msg = f"the principal must be a callable of the request (or its dotted path), not {value!r}"
        raise ConfigurationError(msg)
    return cast(Principal, value)


class _Face:
    """The hooks of one application: its guard, principal and fingerprint. Strictly private."""

    __slots__ = ("__weakref__", "fingerprint", "guard", "principal")

    def __init__(self, guard: Guard, principal: Principal, fingerprint: Fingerprint | None) -> None:
        self.guard = guard
        self.principal = principal
        self.fingerprint = fingerprint

    def before_request(self) -> Response | None:
        """Admit, fingerprint and claim the request: ``None`` to run the view, or the replay or problem to send."""
        guard = self.guard
        g.idempotency_key = None
        environ = request.environ
        method = request.method
        if method not in guard.methods:
            guard.observe("passthrough", environ)
            return None
        path = request_path(environ)
        admitted = guard.admit(request.headers.get(guard.policy.header), path)
        if admitted is None:
            guard.observe("passthrough", environ)
            return None
        if isinstance(admitted, Answer):
            return _send(guard, admitted)
        body = read_body(guard, environ)
        if isinstance(body, Answer):
            return _send(guard, body)
        give_body(environ, body)  # before the principal runs: it may read the request's form or JSON
        try:
            principal = self.principal(request)
        except RequestError as exc:
            return _send(guard, guard.refuse("bad_key", exc))
        if self.principal is default_principal:
            guard.warn_anonymous(principal)
        if self.fingerprint is not None:
            fingerprint = self.fingerprint(request, body)
        else:
            query = environ.get("QUERY_STRING", "").encode("latin-1")
            content_type = environ.get("CONTENT_TYPE", "").encode("latin-1")
            fingerprint = guard.fingerprint(method, path, query, content_type, body)
        claimed = guard.claim(admitted, principal, fingerprint)
        if isinstance(claimed, Answer):
            return _send(guard, claimed)
        g.idempotency_key = admitted
        if isinstance(claimed, FailOpen):
            guard.observe("store_error", environ)
            return None
        guard.observe("executed", environ)
        claimed.enter(head=method == "HEAD")
        setattr(g, _HELD, claimed)
        return None

    def after_request(self, response: Response) -> Response:
        """Record the final response of a claimed request (or, if streamed, wrap its body to record it as it goes)."""
        held: Held | None = g.pop(_HELD, None)
        if held is None:  # not claimed, or answered from before_request (a replay, a problem)
            unknown: Guard | None = g.pop(_UNKNOWN, None)
            if unknown is not None:  # Flask's 500 of an OutcomeUnknownError raised past the error handler
                response.close()
                return _response(unknown.unknown())
            return response
        head = request.method == "HEAD"
        headers = response.get_wsgi_headers(request.environ)  # as the server will send them
        encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.to_wsgi_list()]
        sent = held.start(response.status_code, encoded)
        if response.is_streamed:
            held.leave()  # the view is over; the stream enters the outcome report for each chunk it makes
            stream = held.stream(cast(Iterable[bytes], response.response), head=head)
            if sent:
                response.response = stream
                return response
            stream.close()  # the 500 of an unknown outcome: read and record it, and answer the 503
        else:
            held.chunk(response.get_data())
            held.finish(head=head)
            if sent:
                return response
        response.close()
        return _response(held.guard.unknown())

    def outcome_unknown(self, error: OutcomeUnknownError) -> Response:
        """The view of a claimed request raised :class:`~idempo.OutcomeUnknownError`: keep the key, answer 503."""
        held: Held | None = g.pop(_HELD, None)
        if held is None:  # not a keyed request: Flask's own handling (a 500)
            raise error
        held.mark_unknown()
        held.finish(failed=True)
        return _send(held.guard, held.guard.unknown())

    def request_failed(self, sender: Flask, exception: BaseException, **extra: object) -> None:
        """An exception escaped the view (Flask's ``got_request_exception``, before its 500 or its re-raise):
        release the key, even with ``store_server_errors`` (that 500 is not the app's answer); or keep it if the
        exception says the outcome is unknown, and answer the 503 in place of the 500."""
        held: Held | None = g.pop(_HELD, None)
        if held is None:
            return
        if isinstance(exception, OutcomeUnknownError):
            held.mark_unknown()
            setattr(g, _UNKNOWN, held.guard)
        held.finish(failed=True)

    def teardown_request(self, error: BaseException | None) -> None:
        """Release a key still claimed when the request ends: an exception skipped the ``after_request`` hooks."""
        held: Held | None = g.pop(_HELD, None)
        if held is not None:
            held.finish(failed=True)


def _response(answer: Answer) -> Response:
    """*answer* as a response of the current application, headers and body as they are."""
    response = current_app.response_class(status=answer.status)
    response.headers = Headers([(name.decode("latin-1"), value.decode("latin-1")) for name, value in answer.headers])
    response.response = [answer.body]
    return response


def _send(guard: Guard, answer: Answer) -> Response:
    guard.observe(answer.outcome, request.environ)
    return _response(answer)
