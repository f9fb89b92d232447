"""Private Redis servers and a three-node Redis Cluster for the tests, run from the ``redis-server`` binary.

The shared Redis (``redis_url``) is for the conformance suite; tests that kill, pause, restart or ``SCRIPT FLUSH``
a server get one of their own from here, on a free port of 127.0.0.1, and kill it at teardown. Every server runs
in the foreground (``--daemonize no``) in a session of its own, as a child of the test process; an ``atexit``
hook kills any that a crashed test left behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis

from tests.support.environment import skip_or_fail

__all__ = ["RedisServer", "free_port", "redis_cluster", "require_redis_binaries"]

_RUNNING: set[subprocess.Popen[bytes]] = set()
_START_TIMEOUT = 15.0


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_RUNNING):
        process.kill()
        process.wait()


def require_redis_binaries() -> tuple[str, str]:
    """The paths of ``redis-server`` and ``redis-cli``; skip (fail under ``CI=true``) if they are missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        skip_or_fail("redis-server and redis-cli are not installed: apt-get install redis-server")
    return server, cli


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A port of 127.0.0.1 nobody listens on; with *with_bus*, port + 10000 too (a cluster node's bus port)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536 and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")  # pragma: no cover


class RedisServer:
    """One ``redis-server`` process of the test's own, on *port* (a free one by default), with its files in
    *directory*. ``start`` it again after ``kill`` to restart it on the same port."""

    def __init__(self, directory: Path, port: int | None = None, *, cluster: bool = False, args: tuple[str, ...] = ()):
        self.binary, _ = require_redis_binaries()
        self.directory = directory
        self.cluster = cluster
        self.port = port if port is not None else free_port(with_bus=cluster)
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``."""
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / f"redis-{self.port}.log"),
        ]  # fmt: skip
        if self.cluster:
            command += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.directory / f"nodes-{self.port}.conf"),
            ]
        command += self.args
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _RUNNING.add(self.process)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / f"redis-{self.port}.log"
                self.kill()
                output = log.read_text() if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{output}")
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, with or without a password
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (stopped or not) and reap it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            _RUNNING.discard(self.process)
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.kill(self.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A synchronous client to this server, for the test's own commands (close it: use ``with``)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@contextmanager
def redis_cluster(directory: Path) -> Iterator[str]:
    """A three-node Redis Cluster (no replicas) on free ports, for as long as the ``with`` block runs.

    Yields:
        its URL, ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``.
    """
    _, cli = require_redis_binaries()
    with ExitStack() as stack:
        servers = []
        for _ in range(3):
            server = RedisServer(directory, cluster=True)
            stack.callback(server.kill)  # registered before start: killed whatever happens next
            server.start()
            servers.append(server)
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        created = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{created.stdout.decode()}{created.stderr.decode()}"
            )
        deadline = time.monotonic() + _START_TIMEOUT
        for server in servers:
            with server.client() as client:
                while True:
                    info = client.cluster("info")
                    if info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == 3:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the cluster did not become ready: {info}")
                    time.sleep(0.05)
        yield "redis+cluster://" + ",".join(addresses)
