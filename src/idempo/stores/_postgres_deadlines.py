"""The PostgreSQL stores' deadlines on a server that does not answer, and their look at an idle connection's socket.
Strictly private (see ``postgres.py``'s docstring).

A statement is bounded on the server by ``statement_timeout``; a server that does not answer at all (frozen, or cut
off by the network) is given a second more, after which the connection's socket is shut down, so that the pending
read fails at once and the pool discards the connection: by one timer of the event loop for all the statements of an
async store (:class:`Deadlines`; :class:`Deadline` where a statement has a bound of its own), by one watchdog thread
(:data:`watchdog`) for every sync store.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Self

import psycopg

__all__ = [
    "Deadline",
    "Deadlines",
    "Guard",
    "Watchdog",
    "has_input",
    "readable",
    "readable_poller",
    "shut_down",
    "watchdog",
]


def has_input(conn: psycopg.BaseConnection[Any]) -> bool:
    """Whether an idle connection's socket is readable: the server closed it (or sent a notice). No round trip."""
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    return readable(fd)


def readable(fd: int) -> bool:
    """Whether the socket *fd* has something to read (or its peer closed it), without waiting."""
    return readable_poller(fd)()


def readable_poller(fd: int) -> Callable[[], bool]:
    """:func:`readable` of *fd*, made once per socket: each call is then one system call."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poll = poller.poll
        return lambda: bool(poll(0))
    return lambda: bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows


def shut_down(conn: psycopg.BaseConnection[Any]) -> None:
    """Shut *conn*'s socket down: a read or write pending on it fails at once, and the connection is broken."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return  # already closed
    with suppress(OSError), socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.shutdown(socket.SHUT_RDWR)  # of the socket itself, not just of this duplicate of its descriptor


class Deadline:
    """Shuts a connection's socket down if the server has not answered within *seconds*.

    Not ``asyncio.timeout`` (nor asyncpg's ``timeout=``): a query cancelled that way sends the server a cancel
    request, on a connection of its own, and the connection waits for the answer before its next statement; psycopg
    with a libpq older than 17 sends it from a thread with no time limit of its own. A frozen server would hold
    either. A socket shut down (*kill*: by default a psycopg connection's; asyncpg's ``terminate()``) makes the
    pending read fail at once instead; the connection is broken, and the pool discards it.
    """

    __slots__ = ("_conn", "_handle", "_kill", "expired")

    def __init__(self, conn: Any, seconds: float, kill: Callable[[Any], object] = shut_down) -> None:
        self._conn = conn
        self._kill = kill  # what makes the connection's pending read fail at once
        self.expired = False
        self._handle = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._kill(self._conn)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._handle.cancel()


class Guard:
    """One statement the watchdog (or :class:`Deadlines`) keeps an eye on; see :class:`Watchdog`."""

    __slots__ = ("conn", "done", "expired")

    def __init__(self, conn: psycopg.BaseConnection[Any]) -> None:
        self.conn = conn
        self.done = False
        self.expired = False


class Deadlines:
    """:class:`Deadline` for every statement of one event loop's store, all bounded alike to *seconds*: one timer
    for them all rather than one each (a timer costs more than the rest of the store's own code per statement).

    Every statement gets the same bound, so they run out in the order they started: the timer waits for the
    oldest one; when it fires, it shuts down the sockets of those that ran out, and waits for the oldest still
    running. A statement costs two dictionary writes and a clock read. Used as ``guard = deadlines.start(conn)``,
    the statement awaited, then ``deadlines.finish(guard)`` in a ``finally``; ``guard.expired`` says whether the
    socket was shut down."""

    __slots__ = ("_kill", "_loop", "_running", "_timer", "seconds")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, kill: Callable[[Any], object] = shut_down
    ) -> None:
        self.seconds = seconds
        self._loop = loop
        self._kill = kill  # what makes a connection's pending read fail at once
        self._running: dict[Guard, float] = {}  # guard -> its deadline, oldest first
        self._timer: asyncio.TimerHandle | None = None

    def start(self, conn: Any) -> Guard:
        """Bound the statement about to be sent on *conn*."""
        guard = Guard(conn)
        deadline = self._loop.time() + self.seconds
        self._running[guard] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire, deadline)
        return guard

    def finish(self, guard: Guard) -> None:
        """The statement of *guard* is over (answered, failed, or cancelled)."""
        del self._running[guard]

    def _expire(self, due: float) -> None:
        """The timer set for *due*: shut down the connections that ran out by then, and wait for the oldest other."""
        self._timer = None
        ran_out = []
        for guard, deadline in self._running.items():
            if deadline > due:
                self._timer = self._loop.call_at(deadline, self._expire, deadline)
                break
            if not guard.expired:
                guard.expired = True
                ran_out.append(guard.conn)
        for conn in ran_out:
            self._kill(conn)


class Watchdog:
    """:class:`Deadline` for blocking connections: one daemon thread, shared by every sync store, shuts down the
    socket of a connection whose server has not answered by its deadline. A blocking libpq call cannot be
    interrupted from its own thread; its socket can be shut down from another one, which makes it fail at once.

    A deadline ends (``with``) under the same lock the watchdog fires under, so a connection that was answered
    in time, and may already serve another statement, is never shut down late."""

    def __init__(self) -> None:
        self._reset()
        # A forked child has no watchdog thread (and must not use its parent's connections anyway): start afresh.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Guard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def deadline(self, conn: psycopg.BaseConnection[Any], seconds: float) -> Iterator[Guard]:
        guard = Guard(conn)
        entry = (time.monotonic() + seconds, next(self._order), guard)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="idempo-postgres-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        try:
            yield guard
        finally:
            with self._cond:
                guard.done = True

    def _watch(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                wait = heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, guard = heapq.heappop(heap)
                guard.expired = True
                shut_down(guard.conn)


watchdog = Watchdog()
"""The one watchdog of every sync store."""
