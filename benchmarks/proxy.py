"""``idempo proxy`` over HTTP on loopback: requests/s and latency through the proxy vs. straight to the upstream.

Run it with ``make bench`` (after ``bench.py``) or ``.venv/bin/python benchmarks/proxy.py``; ``--quick`` is a smoke
run, ``--json PATH`` writes the results, ``--store URL`` picks the proxy's store (an SQLite file in a temporary
directory, the proxy's default kind, unless told), ``--workers N`` its worker processes (1 by default).

Theory of operation. Three processes on 127.0.0.1: a trivial upstream (a pure ASGI app under uvicorn that answers a
small JSON document and counts the requests it served), ``idempo proxy`` in front of it (access log off, so that
what is measured is the forwarding and the middleware, not writing to a pipe), and this load generator: *concurrency*
keep-alive connections, each sending its next request as soon as the last answer is in (a closed loop), for
*duration* seconds per case and side. The client is a minimal HTTP/1.1 client on asyncio streams rather than httpx,
so that the client costs as little as possible of the machine the three share. Cases (all ``POST /orders`` with a
small JSON body):

``no-key``
    no ``Idempotency-Key``: the proxy forwards it untouched.
``fresh-key``
    a new key every request: claim, forward, record, complete.
``replay``
    one key, completed before the timing starts: every request is a replay from the store; the upstream is not called.

Each case runs straight to the upstream (the same requests, keys included: the upstream ignores them), then
through the proxy, after a short warm-up of each. Reported: requests/s, the median and 99th percentile latency, and
the ratios proxy/direct. Every answer's status is checked (201), and so is the upstream's own count of requests: a
fresh key must reach the upstream once per request, a replay never. A run that measured the wrong path fails.

These are loopback numbers on whatever else the machine is doing, with the load generator, the proxy and the upstream
sharing its cores: compare the ratios between runs on one machine, not the absolute numbers between machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from _apps import BODY, PATH
from _servers import free_port

HERE: Final = Path(__file__).resolve()
ROOT: Final = HERE.parent.parent
CASES: Final = ("no-key", "fresh-key", "replay")
STARTUP_DEADLINE: Final = 30.0


@dataclass(frozen=True)
class Settings:
    duration: float  # seconds of timed load per case and side
    warmup: float  # seconds of untimed load before each
    concurrency: int


FULL: Final = Settings(duration=4.0, warmup=0.5, concurrency=16)
QUICK: Final = Settings(duration=0.4, warmup=0.1, concurrency=4)


# -- the upstream ---------------------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def upstream_app() -> Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Any]:
    """The benchmark's upstream: 201 and a small JSON document for any request; ``GET /_count`` says how many
    requests it served before."""
    served = 0
    answer = b'{"id":42,"status":"created"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]

    async def app(
        scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        nonlocal served
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        if scope["path"] == "/_count":
            data = str(served).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(data))]}
            )
            await send({"type": "http.response.body", "body": data})
            return
        served += 1
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def serve_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# -- a minimal HTTP/1.1 client ----------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; answers with ``Content-Length`` or chunked bodies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, data: bytes) -> tuple[int, bool]:
        """Send *data* (a whole request); return the status and whether it was a replay."""
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, replayed = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"idempotent-replayed":
                replayed = value.strip() == b"true"
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        return status, replayed

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def make_request(port: int, key: str | None) -> bytes:
    head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(BODY)}\r\n"
    if key is not None:
        head += f"Idempotency-Key: {key}\r\n"
    return head.encode() + b"\r\n" + BODY


@dataclass
class Load:
    """What one timed run of a case on one side measured."""

    requests: int
    seconds: float
    latencies_ms: list[float]
    bad_status: int
    replayed: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(port: int, case: str, seconds: float, concurrency: int, replay_key: str) -> Load:
    """Run *case* against *port* with *concurrency* connections for *seconds*."""
    prefix = uuid.uuid4().hex[:12]
    fixed = make_request(port, None if case == "no-key" else replay_key)
    counter = 0
    latencies: list[float] = []
    bad = replayed = 0
    connections = [await Connection.open(port) for _ in range(concurrency)]
    deadline = time.perf_counter() + seconds

    async def run(connection: Connection) -> None:
        nonlocal counter, bad, replayed
        while time.perf_counter() < deadline:
            if case == "fresh-key":
                counter += 1
                data = make_request(port, f"{prefix}-{counter}")
            else:
                data = fixed
            started = time.perf_counter()
            status, was_replayed = await connection.request(data)
            latencies.append((time.perf_counter() - started) * 1000)
            bad += status != 201
            replayed += was_replayed

    started = time.perf_counter()
    try:
        await asyncio.gather(*(run(connection) for connection in connections))
    finally:
        elapsed = time.perf_counter() - started
        for connection in connections:
            await connection.close()
    return Load(len(latencies), elapsed, latencies, bad, replayed)


async def upstream_count(port: int) -> int:
    connection = await Connection.open(port)
    try:
        connection.writer.write(f"GET /_count HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = await connection.reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                v
                for n, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                if n.lower() == b"content-length"
            )
        )
        return int(await connection.reader.readexactly(length))
    finally:
        await connection.close()


# -- processes ----------------------------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _start(command: list[str], log: Path, *, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


async def _wait_serving(port: int, process: subprocess.Popen[bytes], log: Path, path: str) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        if process.poll() is not None:
            raise SystemExit(f"error: a process exited with {process.returncode}:\n{_read(log)}")
        with suppress(OSError, ValueError, asyncio.IncompleteReadError):
            connection = await Connection.open(port)
            try:
                connection.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                head = await connection.reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"HTTP/1.1 200"):
                    return
            finally:
                await connection.close()
        if time.monotonic() > deadline:
            raise SystemExit(f"error: not serving within {STARTUP_DEADLINE} s:\n{_read(log)}")
        await asyncio.sleep(0.05)  # another process's readiness: nothing to wait on but a poll


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


def _proxy_port(log: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + STARTUP_DEADLINE
    marker = "listening on http://127.0.0.1:"
    while True:
        text = log.read_text(errors="replace")
        if marker in text:
            return int(text.split(marker, 1)[1].split()[0])
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: the proxy did not start:\n{text}")
        time.sleep(0.02)  # the line another process prints


# -- the run ------------------------------------------------------------------------------------------------------


def _summary(run: Load) -> dict[str, Any]:
    return {
        "requests": run.requests,
        "rps": round(run.rps, 1),
        "p50_ms": round(statistics.median(run.latencies_ms), 3),
        "p99_ms": round(run.percentile(0.99), 3),
    }


async def bench(settings: Settings, store: str | None, workers: int, work: Path) -> dict[str, Any]:
    upstream_port = free_port()
    with ExitStack() as stack:
        upstream = _start(
            [sys.executable, str(HERE), "--serve-upstream", str(upstream_port)],
            work / "upstream.log",
            cwd=ROOT,
        )
        stack.callback(_stop, upstream)
        await _wait_serving(upstream_port, upstream, work / "upstream.log", "/_count")
        store_url = store or f"sqlite:///{work / 'idempo-proxy.db'}"
        command = [sys.executable, "-c", "import sys; from idempo._cli import main; sys.exit(main())", "proxy"]
        command += ["--upstream", f"http://127.0.0.1:{upstream_port}", "--listen", "127.0.0.1:0"]
        command += ["--store", store_url, "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
        proxy = _start(command, work / "proxy.log", cwd=work)
        stack.callback(_stop, proxy)
        proxy_port = _proxy_port(work / "proxy.log", proxy)
        await _wait_serving(proxy_port, proxy, work / "proxy.log", "/_idempo/healthz")

        replay_key = f"replay-{uuid.uuid4().hex}"
        primed, _ = await (conn := await Connection.open(proxy_port)).request(make_request(proxy_port, replay_key))
        await conn.close()
        if primed != 201:
            raise SystemExit(f"error: priming the replay key answered {primed}")

        results = []
        failures = []
        for case in CASES:
            row: dict[str, Any] = {"case": case}
            for side, port in (("direct", upstream_port), ("proxy", proxy_port)):
                await load(port, case, settings.warmup, settings.concurrency, replay_key)
                before = await upstream_count(upstream_port)
                run = await load(port, case, settings.duration, settings.concurrency, replay_key)
                reached = await upstream_count(upstream_port) - before
                row[side] = _summary(run) | {"upstream_calls": reached, "replayed": run.replayed}
                expected = 0 if (side == "proxy" and case == "replay") else run.requests
                if run.bad_status:
                    failures.append(f"{case} {side}: {run.bad_status} answers were not 201")
                if reached != expected:
                    failures.append(f"{case} {side}: the upstream served {reached} requests, not {expected}")
                if side == "proxy" and (run.replayed == run.requests) != (case == "replay"):
                    failures.append(f"{case} {side}: {run.replayed} of {run.requests} answers were replays")
            row["rps_ratio"] = round(row["proxy"]["rps"] / row["direct"]["rps"], 3)
            row["p50_ratio"] = round(row["proxy"]["p50_ms"] / row["direct"]["p50_ms"], 3)
            results.append(row)
    return {
        "settings": asdict(settings) | {"quick": settings is QUICK, "store": store or "sqlite (temporary file)"},
        "workers": workers,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "failures": failures,
    }


def report(data: dict[str, Any]) -> str:
    settings = data["settings"]
    lines = [
        f"idempo proxy vs. direct, loopback, {settings['concurrency']} connections, {settings['duration']} s per side; "
        f"store {settings['store']}, {data['workers']} worker(s)",
        f"{'case':<10} {'direct req/s':>12} {'proxy req/s':>12} {'ratio':>6}   "
        f"{'direct p50':>10} {'proxy p50':>10} {'ratio':>6}   {'direct p99':>10} {'proxy p99':>10}",
    ]
    for row in data["results"]:
        direct, proxy = row["direct"], row["proxy"]
        lines.append(
            f"{row['case']:<10} {direct['rps']:>12.0f} {proxy['rps']:>12.0f} {row['rps_ratio']:>6.2f}   "
            f"{direct['p50_ms']:>8.2f}ms {proxy['p50_ms']:>8.2f}ms {row['p50_ratio']:>6.2f}   "
            f"{direct['p99_ms']:>8.2f}ms {proxy['p99_ms']:>8.2f}ms"
        )
    lines.append("ratio: proxy/direct (requests/s: higher is better; latency: lower is better)")
    lines.extend(f"FAILED: {failure}" for failure in data["failures"])
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a fraction of a second per case: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument("--store", metavar="URL", help="the proxy's store (default: an SQLite file in a temp dir)")
    parser.add_argument("--workers", type=int, default=1, help="the proxy's worker processes (default 1)")
    parser.add_argument("--duration", type=float, help="seconds of load per case and side (default 4)")
    parser.add_argument("--concurrency", type=int, help="connections at once (default 16)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    settings = QUICK if args.quick else FULL
    if args.duration is not None or args.concurrency is not None:
        settings = Settings(
            duration=args.duration if args.duration is not None else settings.duration,
            warmup=settings.warmup,
            concurrency=args.concurrency or settings.concurrency,
        )
    with tempfile.TemporaryDirectory(prefix="idempo-proxy-bench-") as work:
        data = asyncio.run(bench(settings, args.store, args.workers, Path(work)))
    print(report(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
