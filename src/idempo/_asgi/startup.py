"""Start-up: a bad store URL given to ``app.add_middleware`` fails the application's start-up, not its requests.
Strictly private."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .._core.errors import ConfigurationError, StoreError
from ..stores import Store, store_from_url
from ..stores._forwarding import ForwardingStore, Operation
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


class UnusableStore(ForwardingStore):
    """Fails every call with the configuration error that made it (closing it does nothing). Strictly private."""

    def __init__(self, error: ConfigurationError) -> None:
        super().__init__(None)
        self.error = error

    def __repr__(self) -> str:
        return f"<unusable store: {self.error}>"

    async def _forward(self, operation: Operation, /, *args: Any, **kwargs: Any) -> Any:
        if operation == "close":
            return None
        raise StoreError(str(self.error)) from self.error


async def fail_startup(error: ConfigurationError, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": f"idempo: {error}"})
