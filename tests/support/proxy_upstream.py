"""The upstream service of the proxy's end-to-end tests: a plain ASGI app, run under uvicorn in a process of its own,
that counts its side effects in files so that the tests can tell how many times an operation really ran.

``uvicorn tests.proxy_upstream:create_app --factory`` with ``IDEMPO_PROXY_UPSTREAM_DIR`` set to a directory. Every
request but ``/health`` also appends its method and raw target to ``<dir>/hits`` (so that a test can tell that
nothing at all reached an upstream).

Routes (any method):

``/op/<name>``
    one execution of the operation *name*: appends a line to ``<dir>/<name>.count`` before answering. Query options:
    ``status=N`` (answer N, default 201); ``hold=1`` (write ``<name>.started`` and wait until ``<name>.release``
    exists before answering, then write ``<name>.done``); ``size=N`` (answer N bytes of a known pattern, streamed in
    64 KiB chunks, instead of JSON); ``cut=1`` (declare a 1000-byte body, send 10 bytes of it, and fail: the server
    closes the connection mid-body). The JSON answer says how many times *name* ran so far and the length and
    SHA-256 of the request body, read as it streamed in; it sets a cookie and a header of its own.
``/echo``
    the request as the upstream saw it (method, path, query, headers, body length and digest) as JSON; no side
    effect. With ``gzip=1``, a gzip-encoded body (``Content-Encoding: gzip``), to check it is never decoded.
``/health``
    200.

``python -m tests.proxy_upstream closing PORT`` (same environment) is another upstream, on raw asyncio streams: it
answers ``/health``, and to every other request it counts ``/op/<name>`` as above, reads the whole request, and
closes the connection without a word.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CHUNK = 64 * 1024


def pattern(size: int) -> bytes:
    """The *size* bytes ``/op/<name>?size=N`` answers: a repeated, position-dependent pattern."""
    block = bytes(range(256)) * (CHUNK // 256)
    whole, rest = divmod(size, CHUNK)
    return block * whole + block[:rest]


def count(directory: Path, name: str) -> int:
    """How many times the operation *name* ran."""
    try:
        return len((directory / f"{name}.count").read_text().splitlines())
    except FileNotFoundError:
        return 0


def create_app() -> App:
    """The upstream app, recording into ``IDEMPO_PROXY_UPSTREAM_DIR``."""
    directory = Path(os.environ["IDEMPO_PROXY_UPSTREAM_DIR"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            if not message.get("more_body", False):
                break
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path: str = scope["path"]
        if path != "/health":
            target = scope.get("raw_path", b"").decode("latin-1") + "?" + scope["query_string"].decode("latin-1")
            with (directory / "hits").open("a") as file:
                file.write(f"{scope['method']} {target}\n")
        if path == "/health":
            await _json(send, 200, {"ok": True})
        elif path == "/echo":
            seen = {
                "method": scope["method"],
                "path": path,
                "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "length": length,
                "sha256": digest.hexdigest(),
            }
            if query.get("gzip"):
                body = gzip.compress(json.dumps(seen).encode(), mtime=0)
                headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            else:
                await _json(send, 200, seen)
        elif path.startswith("/op/"):
            name = path.removeprefix("/op/")
            with (directory / f"{name}.count").open("a") as file:
                file.write(f"{os.getpid()}\n")
            if query.get("hold"):
                (directory / f"{name}.started").touch()
                # A file another process creates: there is no event to wait on, only a poll.
                while not (directory / f"{name}.release").exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                (directory / f"{name}.done").touch()
            if query.get("cut"):
                headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"1000")]
                await send({"type": "http.response.start", "status": 201, "headers": headers})
                await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
                raise RuntimeError("cut off mid-body, on purpose")
            status = int(query.get("status", "201"))
            if "size" in query:
                size = int(query["size"])
                headers = [(b"content-type", b"application/octet-stream"), (b"x-upstream", b"yes")]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                data = pattern(size)
                for start in range(0, size, CHUNK):
                    await send({"type": "http.response.body", "body": data[start : start + CHUNK], "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            answer = {"name": name, "n": count(directory, name), "length": length, "sha256": digest.hexdigest()}
            extra = [(b"set-cookie", b"session=upstream; Path=/"), (b"x-upstream", b"yes")]
            await _json(send, status, answer, extra)
        else:
            await _json(send, 404, {"detail": "not found"})

    return app


async def _json(send: Send, status: int, body: object, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, directory: Path) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1].decode("latin-1")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        path = target.partition("?")[0]
        if path == "/health":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await writer.drain()
        elif path.startswith("/op/"):
            with (directory / f"{path.removeprefix('/op/')}.count").open("a") as file:
                file.write(f"{os.getpid()}\n")
    except (asyncio.IncompleteReadError, ValueError, IndexError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_closing(port: int, directory: Path) -> None:
    server = await asyncio.start_server(lambda r, w: _closing(r, w, directory), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] != ["closing"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tests.proxy_upstream closing PORT")
    asyncio.run(_serve_closing(int(sys.argv[2]), Path(os.environ["IDEMPO_PROXY_UPSTREAM_DIR"])))
