"""Hooks that let a program watch what :class:`~idempo.IdempotencyMiddleware` does: an outcome per request and the
time of every store call. ``idempo proxy`` builds its ``/metrics`` on them; pass your own to count in your metrics
system::

    class Counter:
        def on_request(self, outcome: Outcome, scope: Scope) -> None:
            REQUESTS.labels(outcome).inc()

        def on_store_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
            STORE_SECONDS.labels(operation).observe(seconds)

    app.add_middleware(IdempotencyMiddleware, store=..., observer=Counter())

Observers run on the request's event loop, in the request's path: they must be quick and must not raise (what they
raise is logged and dropped). With no observer the middleware does not time anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any, Literal, Protocol, cast, get_args, runtime_checkable

from .stores._forwarding import ForwardingStore, Operation

__all__ = ["OUTCOMES", "Observer", "Outcome", "StoreOperation"]

Outcome = Literal[
    "passthrough",
    "executed",
    "replayed",
    "conflict",
    "mismatch",
    "bad_key",
    "too_large",
    "store_error",
    "outcome_unknown",
]
"""What the middleware did with one HTTP request:

- ``passthrough``: not protected (a method that is not, or no key where none is required); the app ran as is.
- ``executed``: the request claimed its key and the app ran (whatever it answered).
- ``replayed``: a stored response was sent (or the 410 of one too large to store); the app did not run.
- ``conflict``: 409, the key's first request is still running (after waiting, with ``on_conflict="wait"``).
- ``mismatch``: 422, the key was used for another request.
- ``bad_key``: 400, a malformed key, a missing one where a key is required, or a request the principal refuses
  (two ``Authorization`` headers).
- ``too_large``: 413, a request body over ``max_request_bytes``.
- ``store_error``: the store failed on the claim: 503, or the app ran unprotected with ``on_store_error="fail_open"``.
- ``outcome_unknown``: 503 ``outcome-unknown``, the key's first request may or may not have taken effect; the app
  did not run.

A client that leaves before it has sent its whole body is not counted: nothing was asked.
"""

OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

StoreOperation = Literal["claim", "renew", "complete", "release"]
"""The store calls the middleware makes and times."""

logger = logging.getLogger("idempo")


@runtime_checkable
class Observer(Protocol):
    """Told of every HTTP request's :data:`Outcome` and of the duration of every store call the middleware makes."""

    def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
        """One HTTP request reached the middleware and this is what it did with it."""

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        """A store call took *seconds* (wall clock) and failed with *error*, or succeeded (``None``)."""


_TIMED: frozenset[str] = frozenset(get_args(StoreOperation))


class _ObservedStore(ForwardingStore):
    """The middleware's store calls, timed for an observer (``claim``, ``renew``, ``complete`` and ``release``;
    the others are forwarded as they are). Strictly private: only made when there is one."""

    __slots__ = ("observer",)

    def __init__(self, store: Any, observer: Observer) -> None:
        super().__init__(store)
        self.observer = observer

    def __repr__(self) -> str:
        return repr(self._inner)

    async def _forward(self, operation: Operation, /, *args: Any, **kwargs: Any) -> Any:
        if operation not in _TIMED:
            return await getattr(self._inner, operation)(*args, **kwargs)
        timed = cast("StoreOperation", operation)
        started = time.perf_counter()
        try:
            result = await getattr(self._inner, operation)(*args, **kwargs)
        except BaseException as exc:
            self._tell(timed, time.perf_counter() - started, exc)
            raise
        self._tell(timed, time.perf_counter() - started, None)
        return result

    def _tell(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        try:
            self.observer.on_store_call(operation, seconds, error)
        except Exception:
            logger.exception("idempo: an observer failed")


def tell(observer: Observer, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
    """Tell *observer* of one request's outcome; what it raises is logged, never the request's problem."""
    try:
        observer.on_request(outcome, scope)
    except Exception:
        logger.exception("idempo: an observer failed")
