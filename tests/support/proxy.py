"""Starting ``proxy_upstream`` (beside this module) and ``idempo proxy`` as real processes on 127.0.0.1, for the proxy's
tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 30.0
SHUTDOWN_GRACE = 10.0
_LISTENING = re.compile(r"idempo proxy: listening on (http://\S+)")
_ADMIN = re.compile(r"; admin (http://[^/\s]+)")


def _poll_http(url: str, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    with httpx.Client(timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            with suppress(httpx.TransportError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not serve within {STARTUP_DEADLINE} s:\n{log.read_text()}")
            time.sleep(0.05)  # another process's readiness: nothing to wait on but a poll


@dataclass
class Upstream:
    """``tests.proxy_upstream`` under uvicorn, which can be killed and started again on the same port; or, *closing*,
    its raw server that reads each request and closes the connection without answering."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    closing: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "upstream.log"

    def start(self) -> None:
        """Start it (again) and wait until it answers."""
        env = {**os.environ, "IDEMPO_PROXY_UPSTREAM_DIR": str(self.directory), "PYTHONUNBUFFERED": "1"}
        if self.closing:
            command = [sys.executable, "-m", "tests.support.proxy_upstream", "closing", str(self.port)]
        else:
            command = [sys.executable, "-m", "uvicorn", "tests.support.proxy_upstream:create_app", "--factory"]
            command += ["--host", "127.0.0.1", "--port", str(self.port), "--no-access-log", "--log-level", "warning"]
            command += ["--timeout-graceful-shutdown", "1"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        _poll_http(self.url + "/health", self.process, self.log_path, "the upstream")

    def kill(self) -> None:
        """Kill it at once (SIGKILL): connections break, and connecting is refused."""
        assert self.process is not None
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def count(self, name: str) -> int:
        """How many times the operation *name* ran on the upstream."""
        try:
            return len((self.directory / f"{name}.count").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def started(self, name: str) -> bool:
        return (self.directory / f"{name}.started").exists()

    def done(self, name: str) -> bool:
        """Whether a held request of *name* has finished on the upstream (after its release)."""
        return (self.directory / f"{name}.done").exists()

    def hits(self) -> list[str]:
        """``METHOD TARGET`` of every request that reached it, but its health checks."""
        try:
            return (self.directory / "hits").read_text().splitlines()
        except FileNotFoundError:
            return []

    def release(self, name: str) -> None:
        (self.directory / f"{name}.release").touch()


@contextmanager
def running_upstream(directory: Path, *, closing: bool = False) -> Iterator[Upstream]:
    """An :class:`Upstream` started in *directory*, stopped when the block ends."""
    server = Upstream(directory, closing=closing)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_key() -> dict[str, str]:
    """Headers with a fresh, random ``Idempotency-Key``."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def new_name() -> str:
    """A short random name for an operation (the upstream counts executions by name)."""
    return uuid.uuid4().hex[:10]


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict[str, object]:
    """Check that *response* is a problem document of *status* (and of type *slug*); return its JSON."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, object] = response.json()
    assert document["status"] == status
    assert {"type", "title", "detail"} <= set(document)
    if slug is not None:
        assert str(document["type"]).endswith(slug), document
    return document


@dataclass
class Proxy:
    """A running ``idempo proxy``."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    admin_url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON lines the proxy logged, one per request."""
        records = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records


def proxy_command(*args: str) -> list[str]:
    """The command line of ``idempo proxy ARGS`` with this interpreter."""
    return [sys.executable, "-c", "import sys; from idempo._cli import main; sys.exit(main())", "proxy", *args]


@contextmanager
def run_proxy(
    directory: Path, args: Sequence[str], *, env: dict[str, str] | None = None, prefix: str = "/_idempo/"
) -> Iterator[Proxy]:
    """Start ``idempo proxy --listen 127.0.0.1:0 ARGS`` in *directory*, wait until it serves (its health check under
    *prefix* answers), and stop it on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "proxy.log"
    command = proxy_command("--listen", "127.0.0.1:0", *args)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=directory, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while (match := _LISTENING.search(log_path.read_text(errors="replace"))) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not start (exit {process.poll()}):\n{log_path.read_text()}")
            time.sleep(0.02)  # the line another process prints: nothing to wait on but a poll
        admin = _ADMIN.search(log_path.read_text(errors="replace"))
        proxy = Proxy(match[1], process, log_path, admin[1] if admin else None)
        _poll_http((proxy.admin_url or proxy.url) + prefix + "healthz", process, log_path, "the proxy")
        yield proxy
    finally:
        stop_process_group(process)


@dataclass(frozen=True)
class RawResponse:
    """What came back on a raw connection: the status, headers (lower-case names), body, and whether the server
    closed the connection after it."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)


def address(url: str) -> tuple[str, int]:
    """``("127.0.0.1", 8080)`` of ``http://127.0.0.1:8080``."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    return host, int(port)


def read_response(sock: socket.socket, *, closing: bool = False) -> RawResponse:
    """Read one response (framed by Content-Length, or by the end of the connection) from *sock*; *closing*: see
    also whether the server closes the connection after it (waiting up to 5 s for it to)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before a whole response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    closed = False
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            closed = True
            break
        body += chunk
    if closing and not closed:  # is the connection closed after the response? A closed one reads b"" at once.
        previous = sock.gettimeout()
        sock.settimeout(5.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        finally:
            sock.settimeout(previous)
    return RawResponse(int(status_line.split(" ")[1]), headers, body, closed)


def send_raw(url: str, data: bytes, *, closing: bool = False, timeout: float = 15.0) -> RawResponse:
    """Send *data* as is on a new connection to *url* and read the response (see :func:`read_response`)."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock, closing=closing)
