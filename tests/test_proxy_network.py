"""The proxy's plain-asyncio network backend for httpcore (``idempo.proxy._network``), over real loopback TCP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpcore
import httpx
import pytest

from idempo.proxy import ProxyConfig
from idempo.proxy._forward import ForwardingApp
from idempo.proxy._network import AsyncioBackend
from tests.support.processes import free_port


def _backends(app: ForwardingApp) -> list[object]:
    # httpx keeps its pool private; this is where a change of its layout would show.
    return [transport._pool._network_backend for transport in app.transports]  # type: ignore[attr-defined]


def test_plain_http_upstreams_use_the_asyncio_backend_and_https_ones_keep_httpcores() -> None:
    plain = ForwardingApp(ProxyConfig(upstream="http://127.0.0.1:9"))
    assert plain.transports
    assert all(isinstance(backend, AsyncioBackend) for backend in _backends(plain))
    tls = ForwardingApp(ProxyConfig(upstream="https://127.0.0.1:9"))
    assert not any(isinstance(backend, AsyncioBackend) for backend in _backends(tls))


@asynccontextmanager
async def server(answer: bytes, *, then_close: bool) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP server on 127.0.0.1 that reads a request, writes *answer*, and closes the connection if told to."""
    closed = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if then_close:
            writer.close()
            await writer.wait_closed()
            closed.set()
        else:
            await reader.read()  # hold the connection until the client goes

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        async with srv:
            yield srv.sockets[0].getsockname()[1], closed
    finally:
        for writer in writers:
            writer.close()


async def test_a_request_goes_through_and_an_idle_connection_the_server_closed_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with server(answer, then_close=True) as (port, closed):
        backend = AsyncioBackend()
        stream = await backend.connect_tcp("127.0.0.1", port, timeout=5)
        assert stream.get_extra_info("is_readable") is False
        await stream.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", timeout=5)
        data = b""
        while not data.endswith(b"ok"):
            data += await stream.read(65536, timeout=5)
        assert data == answer
        await closed.wait()
        assert await stream.read(65536, timeout=5) == b""  # the server's FIN
        assert stream.get_extra_info("is_readable") is True
        await stream.aclose()


async def test_connect_refused_and_read_timeout_are_httpcores_errors() -> None:
    backend = AsyncioBackend()
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("127.0.0.1", free_port(), timeout=5)
    async with server(b"", then_close=False) as (port, _):
        stream = await backend.connect_tcp("127.0.0.1", port, timeout=5)
        await stream.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", timeout=5)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(65536, timeout=0.05)
        await stream.aclose()


async def test_httpx_maps_them_as_the_forwarding_app_expects() -> None:
    transport = httpx.AsyncHTTPTransport(retries=0)
    transport._pool = httpcore.AsyncConnectionPool(network_backend=AsyncioBackend())
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{free_port()}/"))
    async with server(b"", then_close=False) as (port, _):
        request = httpx.Request("GET", f"http://127.0.0.1:{port}/", extensions={"timeout": {"read": 0.05}})
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(request)
    await transport.aclose()
