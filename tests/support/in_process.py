"""``pytest --in-process`` (``make check``): the tests that need nothing outside the test process, for the inner loop.

Two layers. Before the run, ``tests/conftest.py`` marks ``external`` every test that needs a server (it uses one of
:data:`SERVER_FIXTURES`, directly or through another fixture), a browser or several processes (it is under
``tests/e2e`` or ``tests/browser``, or marked ``slow``), and ``--in-process`` deselects them. During the run,
:func:`enable` catches what a test's fixtures do not say: a test that starts a child process (``subprocess``,
``multiprocessing``, ``os.fork``: a script, Node, a private redis-server, lint-imports) or asks
:func:`tests.support.environment.require_server` for Redis or PostgreSQL (through ``request.getfixturevalue``, for
a store-kind parameter) is skipped at that point, with the reason. ``make test`` runs them all.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from typing import Any, NoReturn

import pytest

__all__ = ["SERVER_FIXTURES", "disable", "enable", "enabled", "refuse"]

SERVER_FIXTURES = frozenset({"redis_url", "postgres_url", "private_redis", "redis_cluster_url", "table"})
"""The fixtures of ``tests/conftest.py`` that need a server running (or start one)."""

_originals: dict[str, Any] = {}  # what enable() replaced, while it is enabled


def enabled() -> bool:
    return bool(_originals)


def refuse(what: str) -> NoReturn:
    """Skip the running test: it needs *what*, which ``--in-process`` leaves out."""
    __tracebackhide__ = True
    pytest.skip(f"needs {what}: left out by --in-process (make check); make test runs it")


def _refused_child(self: subprocess.Popen[Any], args: Any, *rest: Any, **options: Any) -> None:
    refuse(f"a child process ({_program(args)})")


def _refused_start(self: multiprocessing.process.BaseProcess) -> None:
    refuse(f"a child process (multiprocessing: {self.name})")


def _refused_fork() -> int:
    refuse("a child process (os.fork)")


def enable() -> None:
    """Skip, from now on, any test at the moment it starts a child process (or asks for a server: see
    ``require_server``)."""
    if _originals:
        return
    # Popen's __init__ cleans up when _execute_child raises, so no half-made Popen is left to complain in its
    # __del__; asyncio's subprocesses are Popens too.
    _originals["execute_child"] = subprocess.Popen._execute_child  # type: ignore[attr-defined]
    _originals["start"] = multiprocessing.process.BaseProcess.start
    _originals["fork"] = os.fork
    subprocess.Popen._execute_child = _refused_child  # type: ignore[attr-defined]
    multiprocessing.process.BaseProcess.start = _refused_start  # type: ignore[method-assign]
    os.fork = _refused_fork


def disable() -> None:
    """Undo :func:`enable`."""
    if not _originals:
        return
    subprocess.Popen._execute_child = _originals["execute_child"]  # type: ignore[attr-defined]
    multiprocessing.process.BaseProcess.start = _originals["start"]  # type: ignore[method-assign]
    os.fork = _originals["fork"]
    _originals.clear()


def _program(args: Any) -> str:
    """The program a Popen was asked to run (and its first argument), for the skip's reason."""
    if isinstance(args, str | bytes | os.PathLike):
        return os.fsdecode(args).split(maxsplit=1)[0] if args else "?"
    first = list(args)[:2]
    return " ".join(os.path.basename(os.fsdecode(part)) for part in first) or "?"
