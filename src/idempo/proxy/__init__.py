"""``idempo proxy``: the HTTP contract of idempo in front of any HTTP service, in any language.

A reverse proxy made of :class:`~idempo.IdempotencyMiddleware` in front of an httpx forwarding app, served by
uvicorn. From the command line::

    idempo proxy --upstream http://127.0.0.1:8000 --store redis://127.0.0.1:6379/0 --listen 0.0.0.0:8080 --workers 4

or from Python, as an ASGI application for any server::

    from idempo.proxy import create_app, load_config

    app = create_app(load_config(flags={"upstream": "http://127.0.0.1:8000"}))

Needs the ``cli`` extra (``pip install 'idempo[cli]'``: click, uvicorn, httpx, prometheus-client). See
``docs/proxy.md`` for the options, the configuration file, metrics, logs and the forwarding rules.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from .._core.errors import MissingDependency

try:
    import httpx  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test that hides the module
    if exc.name != "httpx":
        raise
    _msg = "idempo.proxy needs httpx; run: pip install 'idempo[cli]'"
    raise MissingDependency(_msg) from exc

from ._app import ProxyApp, create_app
from ._config import DEFAULT_STORE, OPTIONS, ProxyConfig, load_config
from ._forward import HOP_BY_HOP

__all__ = ["DEFAULT_STORE", "HOP_BY_HOP", "OPTIONS", "ProxyApp", "ProxyConfig", "create_app", "load_config"]
