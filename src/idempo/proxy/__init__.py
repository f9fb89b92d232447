"""``idempo proxy``: the HTTP contract of idempo in front of any HTTP service, in any language.

A reverse proxy made of :class:`~idempo.IdempotencyMiddleware` in front of an httpx forwarding app, served by
uvicorn. From the command line::

    idempo proxy --upstream http://127.0.0.1:8000 --store redis://127.0.0.1:6379/0 --listen 0.0.0.0:8080 --workers 4

or from Python, as an ASGI application for any server::

    from idempo.proxy import create_app, load_config

    app = create_app(load_config(flags={"upstream": "http://127.0.0.1:8000"}))

Needs the ``cli`` extra (``pip install 'idempo[cli]'``: click, uvicorn, httpx, prometheus-client). The configuration
(:class:`ProxyConfig`, :func:`load_config`) is standard library only; :func:`create_app` and :class:`ProxyApp` import
httpx when first used, and raise :class:`~idempo.MissingDependency` without it. See ``docs/proxy.md`` for the
options, the configuration file, metrics, logs and the forwarding rules.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import DEFAULT_STORE, OPTIONS, ProxyConfig, load_config

if TYPE_CHECKING:
    from ._app import ProxyApp, create_app
    from ._forward import HOP_BY_HOP

__all__ = ["DEFAULT_STORE", "HOP_BY_HOP", "OPTIONS", "ProxyApp", "ProxyConfig", "create_app", "load_config"]

_NEEDS_HTTPX = {"ProxyApp": "._app", "create_app": "._app", "HOP_BY_HOP": "._forward"}


def __getattr__(name: str) -> Any:
    module = _NEEDS_HTTPX.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    import importlib

    from ..stores import require

    require("httpx", extra="cli")
    return getattr(importlib.import_module(module, __name__), name)
