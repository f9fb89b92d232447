"""A plain-asyncio network backend for httpcore, under the proxy's httpx transports. Strictly private.

httpcore reaches the network through a pluggable backend; on asyncio it picks its anyio backend, whose cancel scopes,
checkpoints and async-library detection run on every read and write. The proxy forwards many small requests over
keep-alive connections to one upstream, and there that layer is a third of the CPU a forwarded request costs
(measured: 444-492 µs -> 292-340 µs per request, 16 in flight). This backend is asyncio streams and nothing else.

It serves plain ``http://`` upstreams only: ``https://`` keeps httpcore's own backend (``start_tls`` here refuses).
httpx has no public way to pass a backend to ``AsyncHTTPTransport``, so :func:`http_transport` replaces the
transport's pool with an identical one on this backend, and falls back to the transport as it is if httpx ever lays
itself out differently (a test checks the backend is in use, so that would not go unnoticed).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["AsyncioBackend", "http_transport"]

_READ_LIMIT = 2**16


class _Stream(httpcore.AsyncNetworkStream):
    """One TCP connection, as asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - httpcore's API
        try:
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise httpcore.ReadTimeout(f"no data from the upstream in {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 - httpcore's API
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            if timeout is None:
                await self._writer.drain()
            else:
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(f"the upstream did not take the request in {timeout} s") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's API
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("this backend serves http:// upstreams only")  # never chosen for https

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle keep-alive connection the upstream has closed: not to be reused
            return self._reader.at_eof() or self._writer.transport.is_closing()
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network, on asyncio streams (TCP, no TLS)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's API
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local, limit=_READ_LIMIT)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection to {host}:{port} in {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Stream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def http_transport(limits: httpx.Limits, *, plain_http: bool) -> httpx.AsyncHTTPTransport:
    """An ``httpx.AsyncHTTPTransport`` with *limits* and no retries, on :class:`AsyncioBackend` if *plain_http*."""
    transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
    if plain_http and isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        transport._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            retries=0,
            network_backend=AsyncioBackend(),
        )
    return transport
