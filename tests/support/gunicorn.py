"""Running a WSGI (or ASGI, through a worker class) application under a real gunicorn, for the end-to-end tests of
the blocking faces (``idempo.wsgi``, Django, Flask).

``run_gunicorn("tests.e2e.wsgi_app:create_app()", workers=4)`` starts ``python -m gunicorn <that>`` from the
repository's root, bound to a free port of 127.0.0.1, in a session (process group) of its own; it returns once every
worker has loaded the application (each one writes ``ready-<pid>`` into a directory of the runner's own, from
gunicorn's ``post_worker_init`` hook, which this very module provides as gunicorn's ``--config python:...``), and
on exit it stops the whole group (SIGTERM, then SIGKILL after a bounded grace). The application is configured by
*env*, added to the test process's environment.

Example::

    with run_gunicorn("tests.e2e.wsgi_app:create_app()", workers=4, env={"WSGI_E2E_STORE": url, ...}) as server:
        httpx.post(f"{server.base_url}/orders/x", headers={"Idempotency-Key": "k"})
        assert len(server.worker_pids()) == 4

``extra_args=("--preload",)`` builds the app in the master before the fork (the ready files still come from each
worker). ``server.wait_for_workers(n)`` waits for gunicorn to replace a worker a test killed.

Keep the signature of :func:`run_gunicorn` stable: the Django and Flask tests call it too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from .processes import alive, free_port, stop_process_group

__all__ = ["FINISH_RECORDING_ENV", "Gunicorn", "post_worker_init", "run_gunicorn", "worker_exit"]

_REPO = Path(__file__).resolve().parents[2]
_READY_ENV = "IDEMPO_GUNICORN_READY_DIR"
_STARTUP_DEADLINE = 30.0
_CONFIG = f"python:{__name__}"  # gunicorn reads this module's post_worker_init and worker_exit as its hooks


def post_worker_init(worker: Any) -> None:
    """gunicorn's hook, run in each worker once it has loaded the application: write ``ready-<pid>``."""
    directory = os.environ.get(_READY_ENV)
    if directory:
        (Path(directory) / f"ready-{os.getpid()}").touch()


FINISH_RECORDING_ENV = "IDEMPO_GUNICORN_FINISH_RECORDING"


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn's hook, run in each worker as it exits: with ``IDEMPO_GUNICORN_FINISH_RECORDING=<seconds>`` in the
    environment, wait that long at most for the outcomes it is still recording, as docs/wsgi.md tells users to."""
    seconds = os.environ.get(FINISH_RECORDING_ENV)
    if seconds:
        from idempo.wsgi import finish_recording

        finish_recording(timeout=float(seconds))


@dataclass(frozen=True)
class Gunicorn:
    """A running gunicorn: its URL, its supervisor process, where it logs, and the pids of its workers."""

    base_url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    ready_dir: Path

    def worker_pids(self) -> frozenset[int]:
        """The pids of every worker that has loaded the application so far (those gunicorn restarted included)."""
        return frozenset(int(path.name.removeprefix("ready-")) for path in self.ready_dir.glob("ready-*"))

    def live_worker_pids(self) -> frozenset[int]:
        """The pids of the workers that have loaded the application and are still alive (not zombies)."""
        return frozenset(pid for pid in self.worker_pids() if alive(pid))

    def log(self) -> str:
        """What gunicorn and the application printed so far (stdout and stderr, the error log)."""
        return self.log_path.read_text(errors="replace")

    def wait_for_workers(self, count: int, *, within: float = _STARTUP_DEADLINE) -> frozenset[int]:
        """Wait until *count* workers are alive and have loaded the application (e.g. after one was killed, for
        gunicorn to start its replacement); their pids. Fails after *within* seconds, or if gunicorn exited."""
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            live = self.live_worker_pids()
            if len(live) >= count:
                return live
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(live)} of {count} gunicorn workers up after {within} s:\n{self.log()}")
            time.sleep(0.05)  # polling other processes' readiness; there is no event to wait on


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def run_gunicorn(
    app: str,
    *,
    workers: int = 4,
    worker_class: str = "sync",
    threads: int = 1,
    env: Mapping[str, str] = {},
    timeout: int = 30,
    extra_args: Sequence[str] = (),
) -> Iterator[Gunicorn]:
    """Run ``python -m gunicorn <app>`` on a free port of 127.0.0.1 for as long as the ``with`` block runs.

    Args:
        app: what gunicorn serves, ``module:callable`` or ``module:factory()``, imported from the repository's root.
        workers: how many worker processes (``--workers``); the runner waits for each to load the application.
        worker_class: gunicorn's ``--worker-class`` (``sync``, ``gthread``, or a class path).
        threads: ``--threads`` per worker (gthread).
        env: added to the test process's environment for gunicorn and its workers (the application's settings).
        timeout: gunicorn's ``--timeout``: a worker silent for longer is killed and replaced (a sync worker is
            silent for as long as one request runs).
        extra_args: more command-line arguments, after the runner's own.

    Yields:
        the running :class:`Gunicorn`, every worker ready. On exit (even a failing one) the process group is
        stopped: SIGTERM, then SIGKILL after a bounded grace.

    Raises:
        AssertionError: gunicorn exited, or its workers were not ready within 30 s (its log is in the message).
    """
    with TemporaryDirectory(prefix="gunicorn-", ignore_cleanup_errors=True) as name:
        yield from _run(Path(name), app, workers, worker_class, threads, env, timeout, extra_args)


def _run(
    directory: Path,
    app: str,
    workers: int,
    worker_class: str,
    threads: int,
    env: Mapping[str, str],
    timeout: int,
    extra_args: Sequence[str],
) -> Iterator[Gunicorn]:
    ready_dir = directory / "ready"
    ready_dir.mkdir()
    log_path = directory / "gunicorn.log"
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        _CONFIG,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--timeout",
        str(timeout),
        "--graceful-timeout",
        "2",
        "--error-logfile",
        "-",
        "--no-control-socket",  # else every gunicorn of the machine shares ~/.gunicorn/gunicorn.ctl
        *extra_args,
        app,
    ]
    environment = {**os.environ, **env, _READY_ENV: str(ready_dir), "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=_REPO,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Gunicorn(f"http://127.0.0.1:{port}", port, process, log_path, ready_dir)
    try:
        server.wait_for_workers(workers)
        deadline = time.monotonic() + _STARTUP_DEADLINE
        while not _accepts(port):  # the supervisor bound it before forking: this is at once, but make sure
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn does not accept on port {port}:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        stop_process_group(process)
