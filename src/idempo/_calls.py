"""A decorated function's call, as effects its plan yields (``idempo.decorators._Spec.plan``) and the two ways to
perform them: blocking, for a plain function (a thread renews the lease while it runs), and awaiting, for a
coroutine function (a task does). Strictly private."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._core.decide import next_record_pause
from ._core.outcome import OutcomeReport
from ._core.policy import renewal_period
from .stores import Store, SyncStore

__all__ = ["AsyncCall", "Effect", "Run", "Sleep", "StoreCall", "SyncCall"]

logger = logging.getLogger("idempo")

S = TypeVar("S")
F = TypeVar("F")


# -- the effects a call's plan yields -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreCall:
    """A store operation: its method's name and arguments. The same for a Store and a SyncStore."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def on(self, store: Store | SyncStore) -> Any:
        """Call it on *store*: its result, or, on an async store, an awaitable of it."""
        return getattr(store, self.method)(*self.args, **self.kwargs)


@dataclass(frozen=True, slots=True)
class Sleep:
    """Pause, before claiming again (``on_conflict="wait"``)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Run:
    """Run the function, its lease renewed meanwhile, with *report* the current outcome report."""

    token: str
    report: OutcomeReport


Effect = StoreCall | Sleep | Run


# -- the two ways a call's effects are performed ---------------------------------------------------------------------


class _Call(Generic[S, F]):
    """One call of a decorated function: its store, the function and its arguments, its key and its lease."""

    __slots__ = ("args", "fn", "kwargs", "lease", "store", "store_key")

    def __init__(self, store: S, fn: F, args: tuple[Any, ...], kwargs: dict[str, Any], store_key: str, lease: float):
        self.store: S = store
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.store_key = store_key
        self.lease = lease


class SyncCall(_Call[SyncStore, Callable[..., Any]]):
    """Performs a plain function's effects, blocking: the store's calls, pauses, and the function itself (with a
    thread renewing its lease)."""

    __slots__ = ()

    def perform(self, effect: Effect) -> Any:
        if isinstance(effect, StoreCall):
            return effect.on(self.store)
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        renewal = _SyncRenewal(self.store, self.store_key, effect.token, self.lease)
        effect.report.enter()
        try:
            return self.fn(*self.args, **self.kwargs)
        finally:
            effect.report.close()
            renewal.stop()


class AsyncCall(_Call[Store, Callable[..., Awaitable[Any]]]):
    """Performs a coroutine function's effects, awaiting: the store's calls, pauses, and the function itself (with
    a task renewing its lease)."""

    __slots__ = ()

    async def perform(self, effect: Effect) -> Any:
        if isinstance(effect, StoreCall):
            if effect.method in _RECORDING:
                try:
                    return await effect.on(self.store)
                except asyncio.CancelledError:
                    _again_in_background(effect, self.store, self.store_key, self.lease)
                    raise
            return await effect.on(self.store)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        renewal = _AsyncRenewal(self.store, self.store_key, effect.token, self.lease)
        effect.report.enter()
        try:
            return await self.fn(*self.args, **self.kwargs)
        finally:
            effect.report.close()
            renewal.stop()


# Renewal tasks that were stopped during a renewal, and store calls made again after their caller was cancelled
# (_again_in_background), kept until they are over (the loop holds tasks only weakly).
_finishing: set[asyncio.Task[None]] = set()
# The store calls that record a call's outcome (its result, or its key given back).
_RECORDING = frozenset({"complete", "release"})


def _again_in_background(effect: StoreCall, store: Store, store_key: str, lease: float) -> None:
    """The caller was cancelled (a timeout around the call, a worker shutting down) while *effect*, a store call
    that records an outcome, was under way: it may not have been made. Lost with the caller, the result of a
    function that ran would leave its key in progress, and once the lease ran out a repeat would run the function
    again: it is made again in a task of its own, at once, and while it fails for as long as the lease surely lasts
    (renewed every :func:`~idempo._core.policy.renewal_period`, it had at least the rest left when the function
    returned). Fenced by the token, the same call made twice changes nothing."""
    within = lease - renewal_period(lease)  # what the lease surely has left: renewed every period
    task = asyncio.get_running_loop().create_task(_again(effect, store, store_key, within))
    _finishing.add(task)
    task.add_done_callback(_finishing.discard)


async def _again(effect: StoreCall, store: Store, store_key: str, within: float) -> None:
    deadline = time.monotonic() + within
    delay = 0.0
    while True:
        await asyncio.sleep(delay)
        try:
            await effect.on(store)
        except Exception as exc:  # noqa: BLE001 - tried again while the lease lasts
            delay = next_record_pause(delay)
            if time.monotonic() + delay < deadline:
                continue
            logger.error(
                "idempo: could not %s %r after its caller was cancelled (%s); once its lease runs out, a repeat runs "
                "it again",
                effect.method,
                store_key,
                exc,
            )
            return
        logger.info(
            "idempo: %r: its %s, cut short when its caller was cancelled, was made again", store_key, effect.method
        )
        return


class _AsyncRenewal:
    """A task that renews one call's lease every ``lease / 3`` seconds until stopped. Never cancelled during a
    renewal (a store's connection must not be left halfway through a round trip): stopped then, it finishes it."""

    __slots__ = ("lease", "renewing", "stopped", "store", "store_key", "task", "token")

    def __init__(self, store: Store, store_key: str, token: str, lease: float) -> None:
        self.store = store
        self.store_key = store_key
        self.token = token
        self.lease = lease
        self.renewing = False
        self.stopped = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        period = renewal_period(self.lease)
        while True:
            await asyncio.sleep(period)
            self.renewing = True
            try:
                owned = await self.store.renew(self.store_key, self.token, lease=self.lease)
            except Exception as exc:  # noqa: BLE001 - a failed renewal is tried again at the next period
                logger.warning("idempo: could not renew the lease of %r: %s", self.store_key, exc)
                owned = True
            finally:
                self.renewing = False
            if self.stopped:
                return
            if not owned:
                logger.warning(
                    "idempo: %r lost its key while running (its lease ran out and it was taken over)", self.store_key
                )
                return

    def stop(self) -> None:
        """Stop renewing (at once if no renewal is under way; else once it is over)."""
        self.stopped = True
        if self.renewing:
            _finishing.add(self.task)
            self.task.add_done_callback(_finishing.discard)
        else:
            self.task.cancel()


class _SyncRenewal:
    """A daemon thread that renews one call's lease every ``lease / 3`` seconds until stopped."""

    __slots__ = ("lease", "lost", "stopped", "store", "store_key", "thread", "token")

    def __init__(self, store: SyncStore, store_key: str, token: str, lease: float) -> None:
        self.store = store
        self.store_key = store_key
        self.token = token
        self.lease = lease
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"idempo-renew {store_key}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        period = renewal_period(self.lease)
        while not self.stopped.wait(period):
            try:
                owned = self.store.renew(self.store_key, self.token, lease=self.lease)
            except Exception as exc:  # noqa: BLE001 - tried again at the next period
                logger.warning("idempo: could not renew the lease of %r: %s", self.store_key, exc)
                continue
            if not owned:
                if not self.stopped.is_set():
                    logger.warning(
                        "idempo: %r lost its key while running (its lease ran out and it was taken over)",
                        self.store_key,
                    )
                return

    def stop(self) -> None:
        """Stop renewing; returns once no renewal is under way."""
        self.stopped.set()
        self.thread.join()
