"""Flask applications behind :class:`idempo.flask.Idempotency`, for the tests of the Flask face and for the contract
suite that runs one table of scenarios against every blocking face (WSGI, Django, Flask).

Two ways to build one:

- :func:`flask_app` ``(views, /, **idempo_options) -> flask.Flask``: *views* maps URL rules to Flask view functions
  (every method routed to each), protected by ``Idempotency(app, **idempo_options)`` (``store=`` included; memory
  if not given). The view finds the key in ``flask.g.idempotency_key``.
- :func:`flask_from_wsgi` ``(wsgi_app, /, **idempo_options) -> flask.Flask``: every path of a Flask app runs a
  plain WSGI application *inside its view* (so behind the extension's hooks, in the request context): a scenario
  written once as a WSGI app runs behind the Flask face as it is. The WSGI app reads the buffered body from
  ``environ["wsgi.input"]`` and the key from ``environ["idempo.key"]`` (set from ``flask.g.idempotency_key``, as
  the WSGI middleware sets it), and may answer with an iterable (streamed as it comes), ``write()``, or raise.

Both leave ``PROPAGATE_EXCEPTIONS`` off by default, so that an exception in a view is Flask's 500 response, as in
production; pass ``propagate=True`` for the testing behaviour (the exception reaches the test client). *config*
adds to ``app.config`` before the extension reads it. The extension is ``app.extensions["idempo"]``.

Example::

    app = flask_app({"/orders": create_order}, store=store_url, lease=5)
    client = app.test_client()
    first = client.post("/orders", json={...}, headers={"Idempotency-Key": key})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Unpack

import flask
from flask.typing import ResponseReturnValue

from idempo._core.policy import PolicyOptions
from idempo.flask import Idempotency
from idempo.wsgi import KEY_ENVIRON, WSGIApplication

__all__ = ["ALL_METHODS", "IdempoArguments", "extension_of", "flask_app", "flask_from_wsgi"]

ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class IdempoArguments(PolicyOptions, total=False):
    """The keyword arguments of :class:`idempo.flask.Idempotency`: the policy's options and its own."""

    store: Any
    policy: Any
    principal: Any
    fingerprint: Any
    observer: Any


def _new_app(config: Mapping[str, Any] | None, propagate: bool) -> flask.Flask:
    app = flask.Flask("idempo_flask_test")
    app.config["PROPAGATE_EXCEPTIONS"] = propagate
    app.config["SECRET_KEY"] = "idempo-tests"  # sessions, for principals taken from them
    if config:
        app.config.update(config)
    return app


def flask_app(
    views: Mapping[str, Callable[..., ResponseReturnValue]] | None = None,
    /,
    *,
    config: Mapping[str, Any] | None = None,
    propagate: bool = False,
    **idempo_options: Unpack[IdempoArguments],
) -> flask.Flask:
    """A Flask app with *views* (URL rule -> view function, every method) behind ``Idempotency(app,
    **idempo_options)``; the store is ``memory://`` unless ``store=`` (or ``config["IDEMPO_STORE"]``) says."""
    app = _new_app(config, propagate)
    for rule, view in (views or {}).items():
        app.add_url_rule(rule, endpoint=rule, view_func=view, methods=ALL_METHODS)
    if "store" not in idempo_options and "IDEMPO_STORE" not in app.config:
        idempo_options["store"] = "memory://"
    Idempotency(app, **idempo_options)
    return app


def flask_from_wsgi(
    wsgi_app: WSGIApplication,
    /,
    *,
    config: Mapping[str, Any] | None = None,
    propagate: bool = False,
    **idempo_options: Unpack[IdempoArguments],
) -> flask.Flask:
    """A Flask app whose every path runs *wsgi_app* in its view, behind ``Idempotency(app, **idempo_options)``."""

    def view(path: str = "") -> flask.Response:
        return _run_wsgi(wsgi_app)

    return flask_app({"/": view, "/<path:path>": view}, config=config, propagate=propagate, **idempo_options)


def extension_of(app: flask.Flask) -> Idempotency:
    """The extension that protects *app*."""
    extension = app.extensions["idempo"]
    assert isinstance(extension, Idempotency)
    return extension


def _run_wsgi(wsgi_app: WSGIApplication) -> flask.Response:
    """Call *wsgi_app* with the request's environ; its response as a Flask response (streamed as it comes)."""
    environ = flask.request.environ
    environ[KEY_ENVIRON] = flask.g.idempotency_key
    started: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
        if exc_info is not None and exc_info[0] is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [(status, headers)]
        return written.append

    result = wsgi_app(environ, start_response)
    iterator = iter(result)
    first: list[bytes] = []
    try:
        if not started:  # a generator that calls start_response when first iterated
            first.extend(_first(iterator))
    except BaseException:
        _close(result)
        raise
    if not started:
        _close(result)
        msg = "the WSGI application returned without calling start_response"
        raise RuntimeError(msg)
    status, headers = started[0]
    if type(result) is list:  # the whole body at once: a response Flask does not stream
        _close(result)
        return flask.Response(b"".join([*written, *result]), status=int(status[:3]), headers=headers)
    chunks = _chain(written, first, iterator, result)
    return flask.Response(chunks, status=int(status[:3]), headers=headers)


def _first(iterator: Iterator[bytes]) -> list[bytes]:
    for chunk in iterator:
        return [chunk]
    return []


def _chain(written: list[bytes], first: list[bytes], rest: Iterator[bytes], result: Iterable[bytes]) -> Iterator[bytes]:
    try:
        yield from written
        yield from first
        yield from rest
    finally:
        _close(result)


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()
