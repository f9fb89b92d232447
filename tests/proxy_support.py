"""Starting ``tests/proxy_upstream.py`` and ``idempo proxy`` as real processes on 127.0.0.1, for the proxy's tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e._support import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
STARTUP_DEADLINE = 30.0
SHUTDOWN_GRACE = 10.0
_LISTENING = re.compile(r"idempo proxy: listening on (http://\S+)")


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
    """``tests.proxy_upstream`` under uvicorn, which can be killed and started again on the same port."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "upstream.log"

    def start(self) -> None:
        """Start it (again) and wait until it answers."""
        env = {**os.environ, "IDEMPO_PROXY_UPSTREAM_DIR": str(self.directory), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "uvicorn", "tests.proxy_upstream:create_app", "--factory"]
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

    def release(self, name: str) -> None:
        (self.directory / f"{name}.release").touch()


@dataclass
class Proxy:
    """A running ``idempo proxy``."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

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
        proxy = Proxy(match[1], process, log_path)
        _poll_http(proxy.url + prefix + "healthz", process, log_path, "the proxy")
        yield proxy
    finally:
        stop_process_group(process)
