"""The load generators of ``load.py``: wrk, with a Lua script per case, and a fallback in Python for machines without
wrk (see ``load.py``'s docstring). Both keep *connections* keep-alive connections busy in a closed loop and report a
:class:`Run`: requests, seconds, the 50th and 99th percentile latency, and errors (answers neither 2xx nor 3xx,
socket errors, timeouts)."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from _apps import BODY, PATH

# A caller, as in ``make bench``'s requests: idempo keeps each caller's keys apart (the floor does not).
AUTHORIZATION: Final = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJl"

# -- wrk ----------------------------------------------------------------------------------------------------------

_LUA_COMMON: Final = """
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(authorization)s"

-- The figures of the run, as one line of JSON (latencies in microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

# A new key per request: "<prefix>-<thread>-<n>" (wrk runs one Lua state per thread; setup() numbers them).
FRESH_LUA: Final = (
    """-- benchmarks/load.py, fresh-key: a new Idempotency-Key on every request. Arguments: the run's prefix.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

local prefix, counter = "", 0
function init(args)
  prefix = args[1] .. "-" .. thread_number .. "-"
end

function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. counter
  return wrk.format()
end
"""
    + _LUA_COMMON
)

# One key on every request: no request() hook, so wrk builds the request once.
REPLAY_LUA: Final = (
    """-- benchmarks/load.py, replay: the same Idempotency-Key on every request. Arguments: the key.
function init(args)
  wrk.headers["Idempotency-Key"] = args[1]
end
"""
    + _LUA_COMMON
)


@dataclass(frozen=True)
class Run:
    """What one timed run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # answers neither 2xx nor 3xx, socket errors, timeouts

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_version() -> str | None:
    if shutil.which("wrk") is None:
        return None
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr or "wrk").splitlines()[0]
    return first.split(" Copyright")[0].strip()  # "wrk debian/4.1.0-3+b2 [epoll]"


def run_wrk(port: int, script: Path, argument: str, seconds: int, connections: int, threads: int) -> Run:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    command += ["-s", str(script), f"http://127.0.0.1:{port}{PATH}", "--", argument]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    figures = json.loads(lines[-1])
    errors = sum(figures[name] for name in ("connect", "read", "write", "status", "timeout"))
    return Run(
        figures["requests"], figures["duration_us"] / 1e6, figures["p50_us"] / 1e3, figures["p99_us"] / 1e3, errors
    )


# -- the fallback load generator -----------------------------------------------------------------------------------


def request_bytes(port: int, key: str) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: {AUTHORIZATION}\r\nContent-Length: {len(BODY)}\r\nIdempotency-Key: {key}\r\n\r\n"
    )
    return head.encode() + BODY


async def _python_load(port: int, case: str, argument: str, seconds: int, connections: int) -> Run:
    from proxy import Connection

    fixed = request_bytes(port, argument)
    counter = 0
    latencies: list[float] = []
    errors = 0
    opened = [await Connection.open(port) for _ in range(connections)]
    deadline = time.perf_counter() + seconds

    async def drive(connection: Connection) -> None:
        nonlocal counter, errors
        while time.perf_counter() < deadline:
            if case == "fresh-key":
                counter += 1
                data = request_bytes(port, f"{argument}-{counter}")
            else:
                data = fixed
            started = time.perf_counter()
            status, _ = await connection.request(data)
            latencies.append((time.perf_counter() - started) * 1000)
            errors += not 200 <= status < 400

    started = time.perf_counter()
    try:
        await asyncio.gather(*(drive(connection) for connection in opened))
    finally:
        elapsed = time.perf_counter() - started
        for connection in opened:
            await connection.close()
    ordered = sorted(latencies) or [0.0]
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return Run(len(latencies), elapsed, statistics.median(ordered), p99, errors)


class Generator:
    """wrk, or the fallback, with the scripts of both cases."""

    def __init__(self, kind: str, work: Path, connections: int, threads: int) -> None:
        self.kind = kind
        self.connections = connections
        self.threads = threads
        self.scripts = {"fresh-key": work / "fresh.lua", "replay": work / "replay.lua"}
        values = {"body": BODY.decode(), "authorization": AUTHORIZATION}
        self.scripts["fresh-key"].write_text(FRESH_LUA % values)
        self.scripts["replay"].write_text(REPLAY_LUA % values)

    def run(self, port: int, case: str, argument: str, seconds: int) -> Run:
        """*case* against *port* for *seconds*; *argument*: the prefix of fresh keys, or the replayed key."""
        if self.kind == "wrk":
            return run_wrk(port, self.scripts[case], argument, seconds, self.connections, self.threads)
        return asyncio.run(_python_load(port, case, argument, seconds, self.connections))
