"""The async PostgreSQL store's connection pool, over asyncpg's connections. Strictly private (see ``postgres.py``'s
docstring).

Why not asyncpg's own pool: it resets every connection it is given back with a statement of its own (one more round
trip per operation, unless told otherwise), arms a timer and builds a proxy object per use, and opens a missing
connection inside ``acquire`` (so that, with the server down, an operation fails with the connection's error at
once rather than wait ``pool_timeout`` for the pool to make one). This one behaves as ``psycopg_pool``'s (which the
sync store uses) and costs a list's ``pop`` and ``append`` per operation:

- it opens ``min_size`` connections in the background when it opens, and opens another whenever it has fewer;
- an operation that finds no free connection waits for one, up to its time limit (then :class:`PoolTimeout`), while
  the pool opens one more in the background if it has fewer than ``max_size`` (open or opening);
- a connection that fails to open is tried again after 1 s, then 2 s, 4 s... (10% of jitter), for as long as
  ``reconnect_timeout`` allows; then the pool gives up on it (the next operation that waits starts a new attempt);
- a connection given back closed (the server ended it, or the store's deadline did) or inside a transaction is
  thrown away (and replaced, down to ``min_size``); one open for an hour (less up to 5%: the store sets when, as
  the connection opens) is closed as it is given back, and the least recently used free one as another is given
  back, if it has been idle ``max_idle`` (ten minutes) while the pool has more than ``min_size``.

Connections are taken last in, first out: the most recently used, whose caches are warm; the least recently used
are the first to run idle and be closed. The pool knows nothing of asyncpg beyond a connection's ``is_closed()``,
``is_in_transaction()``, ``terminate()`` and ``close(timeout=)``: it opens connections with the callable it is given.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ._postgres_deadlines import readable_poller

__all__ = ["Pool", "PoolTimeout", "Pooled"]

_INITIAL_DELAY = 1.0
_DELAY_JITTER = 0.1
_DELAY_BACKOFF = 2.0
_CLOSE_TIMEOUT = 5.0  # seconds a graceful close may take before the socket is simply closed


class PoolTimeout(Exception):
    """No connection of the pool came within the timeout."""


class Pooled:
    """One connection of the pool: the connection, a poller of its socket (for a look at what an idle one has to
    read), and when it is to be closed (``time.monotonic()``)."""

    __slots__ = ("conn", "expires_at", "idle_since", "poller")

    def __init__(self, conn: Any, fd: int, expires_at: float) -> None:
        self.conn = conn
        self.poller = readable_poller(fd)
        self.expires_at = expires_at
        self.idle_since = 0.0


class Pool:
    """Connections made by *connect* (an opened :class:`Pooled`, or an exception: among *failures*, retried), between
    *min_size* and *max_size*. Belongs to the event loop it was made in."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Pooled]],
        *,
        failures: tuple[type[BaseException], ...],
        min_size: int,
        max_size: int,
        reconnect_timeout: float,
        max_idle: float = 600.0,
    ) -> None:
        self._connect = connect
        self._failures = failures
        self._min_size = min_size
        self._max_size = max_size
        self._reconnect_timeout = reconnect_timeout
        self._max_idle = max_idle
        self._loop = asyncio.get_running_loop()
        self._all: set[Pooled] = set()  # open, free or in use
        self._free: list[Pooled] = []  # the most recently used last
        self._waiters: deque[asyncio.Future[Pooled]] = deque()
        self._size = 0  # connections open (free or in use) and being opened
        self._opening = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def open(self, first: Pooled | None = None) -> None:
        """Start with *first* (a connection opened already) and open the rest of ``min_size`` in the background."""
        if first is not None:
            self._size += 1
            self._all.add(first)
            self._give(first, time.monotonic())
        self._replenish()

    def connections(self) -> list[Pooled]:
        """Every connection open, free or in use."""
        return list(self._all)

    # -- taking and giving back -------------------------------------------------------------------------------

    def free_connection(self) -> Pooled | None:
        """A free connection, if there is one (no waiting). Give it back with :meth:`putconn`."""
        free = self._free
        return free.pop() if free else None

    async def getconn(self, within: float) -> Pooled:
        """A connection, within *within* seconds, else :class:`PoolTimeout`. Give it back with :meth:`putconn`."""
        if self._free:
            return self._free.pop()
        if self._closed:
            msg = "the pool is closed"
            raise PoolTimeout(msg)
        waiter: asyncio.Future[Pooled] = self._loop.create_future()
        self._waiters.append(waiter)
        self._replenish()
        pooled = None
        try:
            async with asyncio.timeout(within):
                pooled = await waiter
        except TimeoutError:
            msg = f"no connection within {within:g} s"
            raise PoolTimeout(msg) from None
        finally:
            if pooled is None:  # given up on (a timeout, a cancellation) or failed (the pool closed)
                if not waiter.done():
                    waiter.cancel()
                    self._waiters.remove(waiter)
                elif not waiter.cancelled() and waiter.exception() is None:
                    self.putconn(waiter.result())  # it came as this operation gave up: for the next one
        return pooled

    def putconn(self, pooled: Pooled) -> None:
        """Give *pooled* back: to the operation waiting longest, else to the free connections; or throw it away if
        it is closed, inside a transaction, or too old. Also close the least recently used free connection if it
        has been idle too long and the pool has more than it needs."""
        conn = pooled.conn
        if self._closed or conn.is_closed() or conn.is_in_transaction():
            self._discard(pooled, graceful=False)
            return
        now = time.monotonic()
        if now >= pooled.expires_at:
            self._discard(pooled, graceful=True)
            return
        self._give(pooled, now)

    def _give(self, pooled: Pooled, now: float) -> None:
        """Hand *pooled*, open and usable, to the operation waiting longest, else to the free connections."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(pooled)
                return
        free = self._free
        if free and now - free[0].idle_since > self._max_idle and self._size > self._min_size:
            self._discard(free.pop(0), graceful=True)
        pooled.idle_since = now
        free.append(pooled)

    # -- opening and closing -----------------------------------------------------------------------------------

    def _replenish(self) -> None:
        """Open connections in the background: up to ``min_size``, and one for each operation waiting beyond those
        being opened, up to ``max_size``."""
        while not self._closed and (
            self._size < self._min_size or (self._size < self._max_size and self._opening < len(self._waiters))
        ):
            self._size += 1
            self._opening += 1
            task = self._loop.create_task(self._add())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _add(self) -> None:
        """Open one connection, trying again with a growing delay for up to ``reconnect_timeout``; give it to the
        pool, or give up on it."""
        try:
            pooled = await self._open_with_retries()
        except BaseException as exc:
            self._size -= 1
            if isinstance(exc, self._failures):
                return  # given up on: the next operation that waits for a connection starts a new attempt
            raise  # a cancellation (the pool closes), or a bug: the task says so
        finally:
            self._opening -= 1
        if self._closed:
            self._size -= 1
            pooled.conn.terminate()
            return
        self._all.add(pooled)
        self._give(pooled, time.monotonic())

    async def _open_with_retries(self) -> Pooled:
        give_up_at = self._loop.time() + self._reconnect_timeout
        delay = _INITIAL_DELAY
        while True:
            try:
                return await self._connect()
            except self._failures:
                delay *= 1 + random.uniform(-_DELAY_JITTER, _DELAY_JITTER)
                if self._closed or self._loop.time() + delay > give_up_at:
                    raise
                await asyncio.sleep(delay)
                delay *= _DELAY_BACKOFF

    def _discard(self, pooled: Pooled, *, graceful: bool) -> None:
        """Throw *pooled* away (closing it in the background if *graceful*), and open another if the pool has too
        few now."""
        self._size -= 1
        self._all.discard(pooled)
        conn = pooled.conn
        if graceful and not conn.is_closed():
            task = self._loop.create_task(self._close_gracefully(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            conn.terminate()
        self._replenish()

    @staticmethod
    async def _close_gracefully(conn: Any) -> None:
        try:
            await conn.close(timeout=_CLOSE_TIMEOUT)
        except Exception:  # noqa: BLE001 - closing a connection nobody uses: whatever went wrong, it is gone
            conn.terminate()

    async def close(self) -> None:
        """Close the free connections (those in use are closed as they are given back), stop opening new ones, and
        fail the operations waiting for one."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolTimeout("the pool is closed"))
        self._waiters.clear()
        free, self._free = self._free, []
        self._all.difference_update(free)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        self._size -= len(free)
        await asyncio.gather(*(self._close_gracefully(pooled.conn) for pooled in free), *tasks, return_exceptions=True)
