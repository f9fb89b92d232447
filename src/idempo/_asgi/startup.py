"""Start-up: a bad store URL given to ``app.add_middleware`` fails the application's start-up, not its requests.
Strictly private."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

from .._core.errors import ConfigurationError, StoreError
from .._core.records import Claim, Record
from ..stores import Store, store_from_url
from .types import Receive, Send

__all__ = ["UnusableStore", "fail_startup", "open_store"]

logger = logging.getLogger("idempo")


def open_store(url: str) -> tuple[Store, ConfigurationError | None]:
    """The store of *url*, and ``None``; or, if the URL is bad and the middleware is being built by Starlette or
    FastAPI for their first request (``app.add_middleware``), a store that fails every call, and the error.

    Raising there would not stop the server: Starlette builds its middleware stack lazily, on the first ASGI call,
    which is the lifespan's, and uvicorn takes an exception in the lifespan for an app without lifespan support;
    then every request, unkeyed GETs included, would build the stack again and answer 500. Instead the error is
    logged, the lifespan start-up fails with it (uvicorn exits: "Application startup failed"), and, under a server
    that runs no lifespan, unkeyed requests pass through while keyed ones get the 503 of an unusable store.
    """
    try:
        return store_from_url(url), None
    except ConfigurationError as exc:
        caller = sys._getframe(2).f_code.co_name  # 0: here, 1: the middleware's __init__, 2: who made it
        if caller != "build_middleware_stack":
            raise
        logger.error("idempo: %s", exc)
        return UnusableStore(exc), exc


class UnusableStore:
    """Fails every call with the configuration error that made it. Strictly private."""

    def __init__(self, error: ConfigurationError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<unusable store: {self.error}>"

    def _fail(self) -> NoReturn:
        raise StoreError(str(self.error)) from self.error

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        self._fail()

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self._fail()

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        self._fail()

    async def release(self, key: str, token: str) -> bool:
        self._fail()

    async def get(self, key: str) -> Record | None:
        self._fail()

    async def delete(self, key: str) -> bool:
        self._fail()

    async def purge_expired(self) -> int:
        self._fail()

    async def close(self) -> None:
        return None


async def fail_startup(error: ConfigurationError, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": f"idempo: {error}"})
