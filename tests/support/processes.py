"""Running ``uvicorn --workers 4`` on the e2e app, and reading what its workers left in the side-effect directory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from idempo._core.fingerprint import principal_digest

__all__ = [
    "WORKERS",
    "Server",
    "TcpProxy",
    "alive",
    "events",
    "lines",
    "poll",
    "poll_async",
    "run_script",
    "run_server",
    "store_key",
    "wait_for_done",
]

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
    db_path: Path  # the SQLite file, when the store is SQLite's
    lease: float
    process: subprocess.Popen[bytes]
    log_path: Path
    store_url: str
    short_lease: float  # of the paths under /short/

    def worker_pids(self) -> frozenset[int]:
        """The pids of every worker that has started so far (including any the supervisor restarted)."""
        return frozenset(int(path.name.removeprefix("ready-")) for path in self.side_dir.glob("ready-*"))

    def log(self) -> str:
        """What uvicorn printed so far."""
        return self.log_path.read_text(errors="replace")

    def live_worker_pids(self) -> frozenset[int]:
        """The pids of the workers that have started and are still alive."""
        return frozenset(pid for pid in self.worker_pids() if alive(pid))


def run_script(
    script: Path, *args: str, timeout: float, env: Mapping[str, str] | None = None, warnings_are_errors: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the Python *script* of the repository with *args* (``-W error`` unless told), from the repository's root,
    within *timeout* seconds (else an AssertionError with what it printed on stderr so far). Not checked: the caller
    asserts on its exit code and output."""
    options = ["-W", "error"] if warnings_are_errors else []
    try:
        return subprocess.run(
            [sys.executable, *options, str(script), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{script.name} {' '.join(args)} took over {timeout} s; stderr so far: {exc.stderr!r}"
        ) from exc


def alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie (a killed worker its supervisor has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc: ask the kernel instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def store_key(key: str, authorization: bytes = b"") -> str:
    """The store key under which the middleware keeps *key* for a request with that ``Authorization`` header
    (none by default): ``<principal digest>:<key>``, as DESIGN-NOTES.md says."""
    return f"{principal_digest(authorization)}:{key}"


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


async def poll_async(
    probe: Callable[[], Awaitable[T]], *, what: str, within: float = 15.0, interval: float = 0.01
) -> T:
    """:func:`poll` with a probe that is a coroutine (a query to a server about other processes)."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
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


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_serving(server: Server, workers: int) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while True:
            if server.process.poll() is not None:
                raise AssertionError(f"uvicorn exited with {server.process.returncode}:\n{server.log()}")
            if len(server.worker_pids()) >= workers:
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not serve within {STARTUP_DEADLINE} s:\n{server.log()}")
            time.sleep(0.05)  # polling another process's readiness; there is no event to wait on


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
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
def run_server(
    directory: Path,
    *,
    lease: float,
    store_url: str | None = None,
    short_lease: float = 2.0,
    workers: int = WORKERS,
    reload_dir: Path | None = None,
) -> Iterator[Server]:
    """Start ``uvicorn --workers 4`` (or *workers*) on a free port of 127.0.0.1, and stop it on exit. Its workers
    share the store at *store_url*, or by default a fresh SQLite file in *directory*. With *reload_dir*, run
    ``uvicorn --reload --reload-dir <reload_dir>`` instead: one server process, the child of a reloader."""
    side_dir = directory / "side"
    side_dir.mkdir()
    db_path = directory / "idempo.db"
    log_path = directory / "uvicorn.log"
    port = free_port()
    if store_url is None:
        store_url = f"sqlite:///{db_path}"
    env = {
        **os.environ,
        "IDEMPO_E2E_DIR": str(side_dir),
        "IDEMPO_E2E_DB": str(db_path),
        "IDEMPO_E2E_STORE": store_url,
        "IDEMPO_E2E_LEASE": str(lease),
        "IDEMPO_E2E_SHORT_LEASE": str(short_lease),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.e2e.app:create_app",
        "--factory",
        *(["--workers", str(workers)] if reload_dir is None else ["--reload", "--reload-dir", str(reload_dir)]),
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
    server = Server(f"http://127.0.0.1:{port}", side_dir, db_path, lease, process, log_path, store_url, short_lease)
    try:
        _wait_until_serving(server, workers if reload_dir is None else 1)
        yield server
    finally:
        for hold in side_dir.glob("*.hold"):
            hold.unlink(missing_ok=True)
        stop_process_group(process)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of *upstream*, run by an event loop in a thread of its own (so that it
    forwards whatever the test's own loop is doing), which the test can :meth:`cut` (stop listening and abort every
    connection, as a server that went away would) and :meth:`restore` on the same port. Use it as a context
    manager: it is closed, and its thread ended, on exit."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="e2e-tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        try:
            self.restore()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def restore(self) -> None:
        """Listen (again, on the same port once it has one) and forward new connections."""
        self._call(self._listen())

    def cut(self) -> None:
        """Stop listening and abort every connection: connecting is refused, and open connections break."""
        self._call(self._cut())

    async def _listen(self) -> None:
        assert self._server is None
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.accepted += 1
        transports = {writer.transport}
        self._transports |= transports
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            transports.add(upstream_writer.transport)
            self._transports |= transports
            await asyncio.gather(self._pump(reader, upstream_writer), self._pump(upstream_reader, writer))
        finally:
            for transport in transports:
                transport.abort()
            self._transports -= transports
            self._handlers.discard(handler)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the other side, or cut(), broke the connection
        finally:
            writer.transport.abort()  # one direction is over: so is the connection, both ways

    def _close(self) -> None:
        if self._thread.is_alive():
            with suppress(Exception):
                self.cut()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
