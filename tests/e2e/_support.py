"""Running ``uvicorn --workers 4`` on the e2e app, and reading what its workers left in the side-effect directory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

__all__ = ["WORKERS", "Server", "events", "lines", "poll", "run_server", "wait_for_done"]

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
WORKERS = 4
STARTUP_DEADLINE = 30.0
SHUTDOWN_GRACE = 10.0


@dataclass(frozen=True)
class Server:
    """A running ``uvicorn --workers 4`` serving ``tests.e2e.app`` on 127.0.0.1."""

    base_url: str
    side_dir: Path
    db_path: Path
    lease: float
    process: subprocess.Popen[bytes]
    log_path: Path

    def worker_pids(self) -> frozenset[int]:
        """The pids of every worker that has started so far (including any the supervisor restarted)."""
        return frozenset(int(path.name.removeprefix("ready-")) for path in self.side_dir.glob("ready-*"))

    def log(self) -> str:
        """What uvicorn printed so far."""
        return self.log_path.read_text(errors="replace")


def lines(path: Path) -> list[str]:
    """The lines of a file the workers append to; none if it does not exist yet."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def events(server: Server, name: str) -> list[tuple[str, int]]:
    """``(what, pid)`` for every ``start`` and ``done`` of the operation ``POST /charge/<name>``, in order."""
    result = []
    for line in lines(server.side_dir / f"{name}.events"):
        what, pid = line.split()
        result.append((what, int(pid)))
    return result


async def poll(probe: Callable[[], T], *, what: str, within: float = 15.0, interval: float = 0.02) -> T:
    """Call *probe* until it returns something true (a state another process produces) and return that, or fail."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_for_done(tasks: list[asyncio.Task[T]], count: int, *, within: float = 15.0) -> None:
    """Wait until at least *count* of *tasks* are done, or fail."""
    deadline = time.monotonic() + within
    while sum(task.done() for task in tasks) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            done = sum(task.done() for task in tasks)
            raise AssertionError(f"timed out after {within} s: {done} of {len(tasks)} requests answered, not {count}")
        await asyncio.wait(
            [task for task in tasks if not task.done()], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_serving(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while True:
            if server.process.poll() is not None:
                raise AssertionError(f"uvicorn exited with {server.process.returncode}:\n{server.log()}")
            if len(server.worker_pids()) >= WORKERS:
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not serve within {STARTUP_DEADLINE} s:\n{server.log()}")
            time.sleep(0.05)  # polling another process's readiness; there is no event to wait on


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate uvicorn's whole process group: SIGTERM, then SIGKILL if it has not exited in time."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=SHUTDOWN_GRACE)
    # Workers are in the supervisor's group too; make sure none outlives it, whatever the supervisor did.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def run_server(directory: Path, *, lease: float) -> Iterator[Server]:
    """Start ``uvicorn --workers 4`` on a free port of 127.0.0.1 with a fresh SQLite file, and stop it on exit."""
    side_dir = directory / "side"
    side_dir.mkdir()
    db_path = directory / "idempo.db"
    log_path = directory / "uvicorn.log"
    port = _free_port()
    env = {
        **os.environ,
        "IDEMPO_E2E_DIR": str(side_dir),
        "IDEMPO_E2E_DB": str(db_path),
        "IDEMPO_E2E_LEASE": str(lease),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.e2e.app:create_app",
        "--factory",
        "--workers",
        str(WORKERS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        "2",
        "--no-access-log",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", side_dir, db_path, lease, process, log_path)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        for hold in side_dir.glob("*.hold"):
            hold.unlink(missing_ok=True)
        _stop(process)
