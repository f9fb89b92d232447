"""Running an ASGI application under a real uvicorn, one process or ``--workers N``, for end-to-end tests that kill
what serves them.

``run_uvicorn("tests.e2e.tx_sqlalchemy_app:create_app", workers=4, env={...})`` starts ``python -m uvicorn --factory
<app>`` from the repository's root, bound to a free port of 127.0.0.1, in a session (process group) of its own; it
returns once every worker has started (each one writes ``ready-<pid>`` into a directory of the runner's own, by
calling :func:`mark_ready` from the application's lifespan startup: the application must do so) and the port
accepts; on exit it stops the whole group (SIGTERM, then SIGKILL after a bounded grace). The application is
configured by *env*, added to the test process's environment.

With ``workers > 1`` uvicorn's supervisor replaces a worker that died: :meth:`Uvicorn.wait_for_workers` waits for
that. With one worker uvicorn is the server process itself, and nothing restarts it once it is killed:
:meth:`Uvicorn.restart` starts it again on the same port, as an orchestrator would (``recover()`` does whichever
applies).

Example::

    with run_uvicorn("tests.e2e.tx_sqlalchemy_app:create_app", workers=1, env={"TX_E2E_MODE": "bound", ...}) as server:
        httpx.post(f"{server.base_url}/charge/x", headers={"Idempotency-Key": "k", "X-Fault": "after-commit"})
        server.recover()  # the worker killed itself
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

from .processes import alive, free_port, stop_process_group

__all__ = ["READY_ENV", "Uvicorn", "mark_ready", "run_uvicorn"]

_REPO = Path(__file__).resolve().parents[2]
READY_ENV = "IDEMPO_UVICORN_READY_DIR"
_STARTUP_DEADLINE = 30.0


def mark_ready() -> None:
    """Write ``ready-<pid>`` into the runner's directory: call it from the application's lifespan startup."""
    directory = os.environ.get(READY_ENV)
    if directory:
        (Path(directory) / f"ready-{os.getpid()}").touch()


class Uvicorn:
    """A running uvicorn: its URL, its (supervisor or single) process, where it logs, and the pids of its workers."""

    def __init__(self, directory: Path, app: str, workers: int, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.ready_dir = directory / "ready"
        self.ready_dir.mkdir()
        self.log_path = directory / "uvicorn.log"
        self.command = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--factory",
            *(["--workers", str(workers)] if workers > 1 else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--timeout-graceful-shutdown",
            "2",
            "--no-access-log",
        ]
        self.env = {**os.environ, **env, READY_ENV: str(self.ready_dir), "PYTHONUNBUFFERED": "1"}
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self.command,
                cwd=_REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def worker_pids(self) -> frozenset[int]:
        """The pids of every worker that has started so far (those restarted included)."""
        return frozenset(int(path.name.removeprefix("ready-")) for path in self.ready_dir.glob("ready-*"))

    def live_worker_pids(self) -> frozenset[int]:
        """The pids of the workers that have started and are still alive (not zombies)."""
        return frozenset(pid for pid in self.worker_pids() if alive(pid))

    def log(self) -> str:
        """What uvicorn and the application printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_workers(self, count: int | None = None, *, within: float = _STARTUP_DEADLINE) -> frozenset[int]:
        """Wait until *count* (by default all) workers are alive and started, and the port accepts; their pids.
        Fails after *within* seconds, or if uvicorn exited."""
        count = self.workers if count is None else count
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"uvicorn exited with {self.process.returncode}:\n{self.log()}")
            live = self.live_worker_pids()
            if len(live) >= count and _accepts(self.port):
                return live
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(live)} of {count} uvicorn workers up after {within} s:\n{self.log()}")
            time.sleep(0.05)  # polling other processes' readiness; there is no event to wait on

    def restart(self) -> frozenset[int]:
        """Start a single-process uvicorn again, on the same port, once its process is gone (killed); the new pid."""
        assert self.workers == 1, "uvicorn's supervisor restarts its own workers: use wait_for_workers()"
        self.process.wait(timeout=10)  # reaped: the killed server is gone, and so is its listening socket
        self.process = self._start()
        return self.wait_for_workers()

    def recover(self) -> frozenset[int]:
        """After a worker was killed: every worker serving again (restarted by the test or by the supervisor)."""
        if self.workers == 1:
            return self.restart()
        return self.wait_for_workers()

    def stop(self) -> None:
        stop_process_group(self.process)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def run_uvicorn(app: str, *, workers: int = 4, env: Mapping[str, str] = {}) -> Iterator[Uvicorn]:
    """Run ``python -m uvicorn --factory <app>`` (``--workers <workers>`` when more than one) on a free port of
    127.0.0.1 for as long as the ``with`` block runs.

    Args:
        app: the application factory, ``module:function``, imported from the repository's root; the application
            it returns must call :func:`mark_ready` at lifespan startup.
        workers: how many worker processes; one is uvicorn's single-process server.
        env: added to the test process's environment for uvicorn and its workers (the application's settings).

    Yields:
        the running :class:`Uvicorn`, every worker ready. On exit (even a failing one) the process group is stopped:
        SIGTERM, then SIGKILL after a bounded grace.

    Raises:
        AssertionError: uvicorn exited, or its workers were not ready within 30 s (its log is in the message).
    """
    with TemporaryDirectory(prefix="uvicorn-", ignore_cleanup_errors=True) as name:
        server = Uvicorn(Path(name), app, workers, env)
        try:
            server.wait_for_workers()
            yield server
        finally:
            server.stop()
