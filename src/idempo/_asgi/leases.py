"""Lease renewal for the keyed requests running on one event loop. Strictly private."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from .._core.policy import renewal_period
from ..stores import Store

__all__ = ["Renewer"]

logger = logging.getLogger("idempo")


class Held(Protocol):
    """A running request whose lease the renewer keeps: its store key, its token, and when it was last renewed."""

    store_key: str
    token: str
    renewed_at: float

    @property
    def in_transaction(self) -> int:
        """Not ``OPEN`` once the app recorded the response in a transaction of its own (idempo._core.bound)."""


class Renewer:
    """Renews the leases of the keyed requests running on one event loop. Strictly private.

    One timer per loop rather than one per request: it fires every ``lease / 3`` seconds while requests run and
    renews those that have held their key for at least ``lease / 6`` (so a request is renewed at the latest
    ``lease / 2`` after its claim or its last renewal, leaving half a lease for the store to answer). The timer
    is not re-armed once no request runs, and needs no cancelling.
    """

    __slots__ = ("lease", "loop", "period", "running", "store", "tasks", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store, lease: float) -> None:
        self.loop = loop
        self.store = store
        self.lease = lease
        self.period = renewal_period(lease)
        self.running: set[Held] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start the timer; the caller has just added to ``running``."""
        self.timer = self.loop.call_later(self.period, self._sweep)

    def _sweep(self) -> None:
        self.timer = None
        if not self.running:
            return
        threshold = time.monotonic() - self.period / 2
        # Not one whose response the app recorded in its own transaction: on PostgreSQL the renewal would wait for
        # that transaction's row lock (renewals piling up, each holding a connection of the pool), and until it ends
        # no other request can take the key over anyway (on SQLite, the app's transaction holds the write lock).
        due = [
            exchange for exchange in self.running if exchange.renewed_at <= threshold and not exchange.in_transaction
        ]
        if due:
            task = self.loop.create_task(self._renew(due))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.timer = self.loop.call_later(self.period, self._sweep)

    async def _renew(self, due: list[Held]) -> None:
        await asyncio.gather(*(self._renew_one(exchange) for exchange in due))

    async def _renew_one(self, exchange: Held) -> None:
        started = time.monotonic()
        try:
            owned = await self.store.renew(exchange.store_key, exchange.token, lease=self.lease)
        except Exception as exc:  # noqa: BLE001 - a failed renewal is tried again at the next sweep
            logger.warning("idempo: could not renew the lease of a running request: %s", exc)
            return
        if owned:
            exchange.renewed_at = started
        elif exchange in self.running:
            self.running.discard(exchange)
            if not exchange.in_transaction:  # else the app's transaction completed the key: it is not lost
                logger.warning("idempo: a running request lost its key (its lease ran out and a retry took it over)")
