"""Recording the outcome of one keyed request: completing or releasing its key, falling back to the few bytes of the
"not stored" marker when the store is full, and trying again in the background while the lease lasts when the
store fails. Strictly private."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .._core.bound import OPEN, Bound
from .._core.decide import RECORD_RETRY_FIRST, fallback, next_record_pause
from .._core.errors import StoreFullError
from ..stores import Store

if TYPE_CHECKING:
    from ..asgi import IdempotencyMiddleware

__all__ = ["Recording"]

logger = logging.getLogger("idempo")


class Recording:
    """How one claimed key's outcome reaches the store: a part of :class:`~idempo._asgi.exchange.Exchange` (a mixin,
    so that recording costs no object of its own on every request), which provides the attributes below."""

    __slots__ = ()

    mw: IdempotencyMiddleware
    reporting: bool  # the exchange is the running request's outcome report (OutcomeReport)
    made: Bound | None  # its Bound, if a binding asked for it
    store: Store
    store_key: str
    fingerprint: str
    status: int

    @property
    def in_transaction(self) -> int:
        """Whether the app recorded the response in a transaction of its own: ``OPEN`` (no), ``RECORDED`` (yes, and
        no one saw that transaction commit: it may have rolled back) or ``COMMITTED``."""
        bound = self.made if self.reporting else None  # a Bound no binding asked for is OPEN
        return OPEN if bound is None else bound.state

    def _record_in_background(
        self, token: str, payload: bytes | None, ttl: float, deadline: float, *, cancelled: bool = False
    ) -> None:
        """Keep trying to record an outcome (*payload* ``None``: release) until *deadline* (monotonic clock),
        when the lease runs out. *cancelled*: the request was cancelled while the store had the call, which may or
        may not have been made; it is made again at once (fenced by the token, the same completion or release made
        twice changes nothing)."""
        background = self.mw._background  # the tasks still recording, held (the loop holds tasks only weakly)
        task = asyncio.get_running_loop().create_task(self._record_later(token, payload, ttl, deadline, cancelled))
        background.add(task)
        task.add_done_callback(background.discard)

    async def _apply(
        self, token: str, payload: bytes | None, ttl: float, *, fall_back: bool, again: bool = False
    ) -> None:
        """Release the key (*payload* ``None``) or complete it with *payload*. If the store refuses that for want
        of room (:class:`~idempo.StoreFullError`), or fails otherwise and *fall_back*, complete it with the
        :func:`~idempo._core.decide.fallback` instead: the few bytes that say the operation ran. *again*: a call
        made before may have done it already (see :meth:`_record_in_background`)."""
        store = self.store
        if payload is None:
            await store.release(self.store_key, token)
            return
        try:
            done = await store.complete(self.store_key, token, payload, ttl=ttl)
        except Exception as exc:  # noqa: BLE001 - raised again unless the fallback is what it calls for
            payload, done = await self._complete_smaller(exc, token, payload, ttl, fall_back=fall_back)
        if done or not again:  # not done again: most likely because the cancelled call was made after all
            self._completed(done, payload, ttl)

    async def _complete_smaller(
        self, exc: Exception, token: str, payload: bytes, ttl: float, *, fall_back: bool
    ) -> tuple[bytes, bool]:
        """Completing the key with *payload* failed with *exc*: complete it with the :func:`fallback` instead if that
        is what the failure calls for (see :meth:`_apply`), and return it with the store's answer; else raise *exc*."""
        smaller = fallback(payload, self.status) if fall_back or isinstance(exc, StoreFullError) else None
        if smaller is None:
            raise exc
        logger.error("idempo: could not store a response (%s); storing that the request ran instead", exc)
        return smaller, await self.store.complete(self.store_key, token, smaller, ttl=ttl)

    def _completed(self, done: bool, payload: bytes, ttl: float) -> None:
        """The store answered *done* to the completion with *payload*."""
        if not done:
            if self.in_transaction == OPEN:
                logger.warning("idempo: a request finished after its key was taken over; its response is not stored")
            # else the app's transaction completed the key (it committed: nothing more to write), or it rolled back
            # unseen and the key was taken over since: either way, not a response to cache
        elif self.mw.cache is not None and payload[:1] == b"\x01":  # a response; markers are never cached
            self.mw.cache.put(self.store_key, self.fingerprint, payload, time.monotonic(), ttl)

    def _recorded_in_transaction(self) -> None:
        """The app's transaction completed the key: remember its response, if the cache is on."""
        bound = self.made if self.reporting else None
        payload = None if bound is None else bound.payload
        if self.mw.cache is not None and bound is not None and payload is not None and payload[:1] == b"\x01":
            self.mw.cache.put(self.store_key, self.fingerprint, payload, time.monotonic(), bound.ttl)

    async def _record_later(
        self, token: str, payload: bytes | None, ttl: float, deadline: float, cancelled: bool = False
    ) -> None:
        delay = 0.0 if cancelled else RECORD_RETRY_FIRST
        failure: Exception | None = None
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            # The response itself while there is time for another try (a store that was down keeps it when it comes
            # back); on the last try before the lease runs out, the marker if the response will not go in.
            after = next_record_pause(delay)
            last = time.monotonic() + after >= deadline
            try:
                await self._apply(token, payload, ttl, fall_back=last, again=cancelled)
            except Exception as exc:  # noqa: BLE001 - as in _record
                failure = exc
                delay = after
                continue
            if cancelled:
                done = "its key was released" if payload is None else "its outcome was recorded"
                logger.info("idempo: a request was cancelled while the store had its call; %s in the background", done)
            else:
                logger.warning("idempo: the outcome of a request was recorded after the store came back")
            return
        logger.error(
            "idempo: gave up recording the outcome of a request (%s); once its lease runs out, a retry runs it again",
            failure,
        )
