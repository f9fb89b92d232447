"""Finding the other workers of the server this process belongs to. Strictly private.

Theory of operation. What makes several processes *workers of one server* is that they accept connections on the
same listening socket: ``uvicorn --workers N``, gunicorn and hypercorn bind it once in the supervisor and hand it to
every worker, and a pre-forked child inherits it. So the other workers of this process are its siblings (the other
children of its parent) that hold one of this process's listening sockets, which Linux shows under ``/proc``:
``/proc/<pid>/fd/<n>`` links to ``socket:[<inode>]``, and our own descriptors tell whether they listen
(``SO_ACCEPTCONN``).

What this never mistakes for workers: a process with no listening socket (a test suite, a script, a Celery worker,
a notebook), the child of ``uvicorn --reload`` (its parent holds the socket, but a parent is not a sibling, and the
reloader stops the old child before it starts the next), servers that bind sockets of their own (even on one port
with ``SO_REUSEPORT``: each socket is its own), and a supervisor's helpers that do not hold the socket. What it
cannot see: workers in other containers or on other machines, processes of another user (their ``/proc`` entries
are not ours to read), and anything outside Linux (no ``/proc``): then it finds nobody.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator

__all__ = ["other_workers"]


def other_workers() -> list[int]:
    """The pids of this process's siblings that hold one of its listening sockets, in order; ``[]`` if there are
    none or they cannot be seen. Takes a few milliseconds: call it once in a while, not per request."""
    listening = _listening_inodes()
    if not listening:
        return []
    me = os.getpid()
    return sorted(pid for pid in _siblings() if pid != me and _holds(pid, listening))


def _listening_inodes() -> set[int]:
    """The inodes of the listening sockets this process has a descriptor of."""
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:  # not Linux, or no /proc
        return set()
    inodes = set()
    for name in descriptors:
        # No descriptor is copied or closed here: closing a copy of a file's descriptor drops every POSIX lock this
        # process holds on that file (SQLite's among them: another process then takes itself for the last one and
        # deletes the WAL under this one's connections). Only sockets are looked at, through their links, and
        # through a socket object that never closes what it wraps (detached).
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:["):
                continue
            fd = int(name)
            info = os.fstat(fd)
        except (OSError, ValueError):
            continue  # closed since the listing (the listing's own descriptor, for one)
        if not stat.S_ISSOCK(info.st_mode):
            continue  # closed and reused since its link was read
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # closed meanwhile, or a socket of a family Python does not know
            continue
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                inodes.add(info.st_ino)
        except OSError:
            pass
        finally:
            sock.detach()
    return inodes


def _siblings() -> Iterator[int]:
    """The children of this process's parent (this one included)."""
    parent = os.getppid()
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
        children = [_read(f"/proc/{parent}/task/{task}/children") for task in tasks]
    except OSError:  # a kernel without /proc/<pid>/task/<tid>/children: read every process's parent instead
        yield from _children_by_scan(parent)
        return
    for listing in children:
        yield from (int(pid) for pid in listing.split())


def _children_by_scan(parent: int) -> Iterator[int]:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _read(f"/proc/{name}/stat").rpartition(")")[2].split()  # "<pid> (<comm>) <state> <ppid> ..."
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(parent):
            yield int(name)


def _holds(pid: int, inodes: set[int]) -> bool:
    """Whether process *pid* has a descriptor of one of the sockets *inodes*."""
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:  # gone, or not ours to look at
        return False
    for name in names:
        try:
            target = os.readlink(f"{directory}/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False


def _read(path: str) -> str:
    with open(path, encoding="ascii") as file:
        return file.read()
