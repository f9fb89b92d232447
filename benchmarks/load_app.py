"""The server ``load.py`` puts under load: a trivial FastAPI endpoint, bare, behind idempo's ``IdempotencyMiddleware``
or behind the floor (``floor.py``), chosen by environment variables, for ``uvicorn --factory``::

    IDEMPO_LOAD_VARIANT=idempo IDEMPO_LOAD_STORE=sqlite:///tmp/load.db \\
        uvicorn --app-dir benchmarks --factory load_app:create_app --workers 2

``IDEMPO_LOAD_VARIANT``
    ``bare`` (the default), ``idempo`` or ``floor``.
``IDEMPO_LOAD_STORE``
    idempo's store URL (``sqlite:///path``, ``redis://...?prefix=...``, ``postgresql://...?table=...``), the middleware
    configured as ``make bench`` configures it (as ``_apps.wrap``: the same ttl and lease, no replay cache).
``IDEMPO_FLOOR_STORE``, ``IDEMPO_FLOOR_URL``, ``IDEMPO_FLOOR_PREFIX``, ``IDEMPO_FLOOR_TABLE``
    the floor's store (``sqlite``, ``redis``, ``postgres``), its file or server, and where on it the floor keeps its
    records: read by ``floor.floor_app_from_env``.
``IDEMPO_LOAD_READY_DIR``
    if set, each worker writes ``ready-<pid>`` there once its application has started (lifespan startup).

``POST /orders`` answers 201 and ``{"id": <n>, "worker": <pid>}``, ``n`` counting the requests this process ran: a
replay answers the body of the request it replays, a request that ran answers a new one, which is how ``load.py``
checks that each variant takes the path it means to before it is timed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from _apps import LEASE, PATH, TTL
from fastapi import FastAPI

from idempo import IdempotencyMiddleware
from idempo.asgi import ASGIApp

VARIANTS: Final = ("bare", "idempo", "floor")


def make_app() -> FastAPI:
    """The endpoint, and the lifespan that says the worker is ready."""
    counter = itertools.count(1)
    pid = os.getpid()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ready = os.environ.get("IDEMPO_LOAD_READY_DIR")
        if ready:
            (Path(ready) / f"ready-{os.getpid()}").touch()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post(PATH, status_code=201)
    async def create_order() -> dict[str, Any]:
        return {"id": next(counter), "worker": pid}

    return app


def create_app() -> ASGIApp:
    """The application the environment asks for (see the module's docstring)."""
    variant = os.environ.get("IDEMPO_LOAD_VARIANT", "bare")
    app = make_app()
    if variant == "bare":
        return app
    if variant == "idempo":
        return IdempotencyMiddleware(app, store=os.environ["IDEMPO_LOAD_STORE"], ttl=TTL, lease=LEASE, cache_size=0)
    if variant == "floor":
        from floor import floor_app_from_env

        return floor_app_from_env(app)
    msg = f"IDEMPO_LOAD_VARIANT={variant!r}: one of {', '.join(VARIANTS)}"
    raise SystemExit(msg)
