"""Lease renewal for the keyed requests a blocking face is running: one daemon thread per face and process, never
one per request. Strictly private."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Protocol

from .._core.policy import renewal_period
from ..stores import SyncStore

__all__ = ["ThreadRenewer"]

logger = logging.getLogger("idempo")


class Held(Protocol):
    """A running request whose lease the renewer keeps: its store key, its token, and when it was last renewed."""

    store_key: str
    token: str
    renewed_at: float

    @property
    def in_transaction(self) -> int:
        """Not ``OPEN`` once the app recorded the response in a transaction of its own (idempo._core.bound)."""


class ThreadRenewer:
    """Renews the leases of the keyed requests running in this process, from one daemon thread.

    The thread wakes every ``lease / 3`` seconds while requests run and renews those that have held their key for at
    least ``lease / 6`` (so each is renewed at the latest ``lease / 2`` after its claim or last renewal, leaving half
    a lease for the store to answer), as the ASGI middleware's timer does. Once nothing has run for a whole lease,
    the thread ends (the next request starts another), so that idle faces hold no thread. A forked child (gunicorn
    with ``--preload``) starts its own: threads do not survive ``fork``.
    """

    def __init__(self, store: SyncStore, lease: float) -> None:
        self.store = store
        self.lease = lease
        self.period = renewal_period(lease)
        self._running: set[Held] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pid = 0  # the process whose thread runs, 0 when none does

    def hold(self, request: Held) -> None:
        """Keep *request*'s lease from now until :meth:`drop`."""
        request.renewed_at = time.monotonic()
        with self._lock:
            if self._pid != os.getpid():  # no thread in this process (the first request, an idle end, a fork)
                self._running = set()
                self._pid = os.getpid()
                threading.Thread(target=self._run, args=(self._pid,), name="idempo-renewer", daemon=True).start()
            self._running.add(request)
            if len(self._running) == 1:
                self._wake.notify()

    def drop(self, request: Held) -> None:
        """Stop renewing *request*'s lease (its outcome is being recorded)."""
        with self._lock:
            self._running.discard(request)

    def _run(self, pid: int) -> None:
        while True:
            with self._lock:
                if not self._running:
                    self._wake.wait(self.lease)
                    if not self._running:  # idle for a lease: end; the next request starts another thread
                        if self._pid == pid:
                            self._pid = 0
                        return
            time.sleep(self.period)  # the one pause between sweeps: nothing waits on this thread
            threshold = time.monotonic() - self.period / 2
            with self._lock:
                # Not one whose response the app recorded in its own transaction: on PostgreSQL the renewal would
                # wait for that transaction's row lock (holding a connection of the pool, and this thread), and until
                # it ends no other request can take the key over anyway (SQLite: the write lock is the app's).
                due = [
                    request
                    for request in self._running
                    if request.renewed_at <= threshold and not request.in_transaction
                ]
            for request in due:
                self._renew(request)

    def _renew(self, request: Held) -> None:
        started = time.monotonic()
        try:
            owned = self.store.renew(request.store_key, request.token, lease=self.lease)
        except Exception as exc:  # noqa: BLE001 - a failed renewal is tried again at the next sweep
            logger.warning("idempo: could not renew the lease of a running request: %s", exc)
            return
        if owned:
            request.renewed_at = started
            return
        with self._lock:
            if request in self._running:
                self._running.discard(request)
                if not request.in_transaction:  # else the app's transaction completed the key: it is not lost
                    logger.warning(
                        "idempo: a running request lost its key (its lease ran out and a retry took it over)"
                    )
