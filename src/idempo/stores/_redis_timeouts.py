"""The asyncio Redis store's bound on each command: one timer per event loop for every command in flight. Strictly
private (see ``redis.py``'s docstring).

Why. With a ``socket_timeout``, redis-py's asyncio connection runs every command's write in ``asyncio.wait_for`` (a
task, a timer and two more turns of the event loop) and its read under ``asyncio.timeout`` (a timer): about a
quarter of the client's time per command, measured. So the store's client for one server is made without one, and
the store bounds each command itself, as ``asyncio.timeout`` would, by cancelling the task that waits for it; but
with one timer for all the commands of a loop rather than one per command. Every command gets the same *timeout*,
so they run out in the order they started: the timer waits for the oldest one, and when it fires, cancels those
that ran out and waits for the oldest still running. A command costs two dictionary writes and a clock read.

A cancelled command leaves redis-py's connection as a timeout of its own does: redis-py closes a connection whose
write or read was interrupted, so that no reply is left for the next command to read.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Deadlines"]


class Deadlines:
    """The commands in flight on one event loop's client, each bounded to *timeout* seconds. Strictly private.

    Used as ``task = deadlines.start()``, then ``await`` the command, then ``deadlines.finish(task)`` in a
    ``finally``; a ``CancelledError`` from the command is a timeout if :meth:`ran_out` says so."""

    __slots__ = ("_expired", "_loop", "_running", "_timer", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.timeout = timeout
        self._loop = loop
        self._running: dict[asyncio.Task[Any], float] = {}  # task -> deadline, oldest first
        self._expired: dict[asyncio.Task[Any], int] = {}  # task -> its cancelling() before the timer cancelled it
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> asyncio.Task[Any]:
        """Bound the command the current task is about to await; the task, for :meth:`finish`."""
        task = asyncio.current_task(self._loop)
        if task is None:
            msg = "the Redis store's commands run in an asyncio task"
            raise RuntimeError(msg)
        deadline = self._loop.time() + self.timeout
        self._running[task] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire, deadline)
        return task

    def ran_out(self, task: asyncio.Task[Any]) -> bool:
        """Whether the ``CancelledError`` *task* got came from the timer alone (then it is a timeout); and take
        the timer's cancellation back, as ``asyncio.timeout`` does."""
        before = self._expired.pop(task, None)
        return before is not None and task.uncancel() <= before

    def finish(self, task: asyncio.Task[Any]) -> None:
        """The command of *task* is over."""
        del self._running[task]
        if self._expired:
            self.ran_out(task)  # a cancellation the command swallowed, or one it answered with another error

    def _expire(self, due: float) -> None:
        """The timer set for *due*: cancel the commands that ran out by then, and wait for the oldest other one."""
        self._timer = None
        for task, deadline in self._running.items():
            if deadline > due:
                self._timer = self._loop.call_at(deadline, self._expire, deadline)
                return
            if task not in self._expired:
                self._expired[task] = task.cancelling()
                task.cancel()
