"""The forwarding app: an ASGI application that sends each request on to the upstream with httpx, and streams the
upstream's response back. It knows nothing of idempotency; the middleware wraps it. Strictly private.

Theory of operation. The request line and headers are rewritten (hop-by-hop headers dropped, ``Host`` and the
``X-Forwarded-*`` headers set), and the body is streamed to the upstream as the client sends it (a keyed request's
body arrives in one piece, buffered by the middleware). Once the upstream's status and headers arrive they are sent on
(hop-by-hop headers dropped), then its body, chunk by chunk, as raw bytes: never decoded nor decompressed, so a
``Content-Encoding`` and a ``Content-Length`` stay true. An upstream that cannot be reached, or breaks before its
status line, is a 502 problem document; one that takes too long, a 504. An upstream that breaks in the middle of its
body cannot be reported (the status is sent already): the exception propagates, the server aborts the connection, and
the middleware releases the key, so that a retry runs again.

Requests go straight to httpx's transport (``httpx.AsyncHTTPTransport``: the connection pool an ``AsyncClient``
sends through), built by hand. What the client would add on top is what a proxy must not do: default headers
(``Accept-Encoding``, ``User-Agent``), authentication, following redirects, a cookie jar shared by every caller,
environment proxies; and skipping its layers makes a forwarded request about a sixth cheaper. Under a plain
``http://`` upstream the transports' pools run on a plain-asyncio network backend rather than anyio (``._network``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Final
from urllib.parse import quote, urlsplit

import httpx

from .._core.problem import Problem
from ..asgi import Message, Receive, Scope, Send
from ._config import ProxyConfig
from ._network import http_transport

__all__ = ["HOP_BY_HOP", "ForwardingApp", "UpstreamObserver"]

logger = logging.getLogger("idempo.proxy")

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
"""Headers that concern one connection, never forwarded either way (RFC 9110 section 7.6.1); the ones that a
``Connection`` header names are dropped too, and so is ``Expect`` (the server in front answers ``100 Continue``)."""

_DROPPED_REQUEST: Final = HOP_BY_HOP | {b"host", b"expect"}
_POOL_SHARDS: Final = 8
_FORWARDED_FOR: Final = b"x-forwarded-for"
_FORWARDED_PROTO: Final = b"x-forwarded-proto"
_FORWARDED_HOST: Final = b"x-forwarded-host"

UpstreamObserver = Callable[[float | None, str | None], None]
"""Told of each upstream exchange: ``(seconds until the response headers, None)`` or ``(None, reason)`` with reason
``"unreachable"``, ``"timeout"`` or ``"broken"`` (the response broke off after its headers)."""


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded. Strictly private."""


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(tokens)


class ForwardingApp:
    """Forward every HTTP request to ``config.upstream`` and stream the answer back.

    Args:
        config: the upstream, timeouts, pool size, ``host_header``, ``trust_forwarded`` and ``problem_base_uri``.
        transport: an httpx transport to use instead of a connection pool to the upstream (for tests).
        observe: told of each exchange's latency or failure (for metrics).
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        observe: UpstreamObserver | None = None,
    ) -> None:
        parts = urlsplit(config.upstream)
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.upstream_host = parts.netloc.encode("ascii")
        self.preserve_host = config.host_header == "client"
        self.trust_forwarded = config.trust_forwarded
        self.problem_base = config.problem_base_uri
        self.observe = observe
        self.timeout = httpx.Timeout(
            config.upstream_timeout, connect=config.connect_timeout, pool=config.upstream_timeout
        ).as_dict()
        if transport is not None:
            self.transports: list[httpx.AsyncBaseTransport] = [transport]
        else:
            # Several small pools rather than one large one: httpcore's pool does work proportional to its
            # connections times its waiting requests on every request, which dominates the cost of a request once a
            # few dozen are in flight; requests take the pools in turn.
            shards = min(_POOL_SHARDS, config.max_connections)
            size = -(-config.max_connections // shards)
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            plain_http = parts.scheme == "http"
            self.transports = [http_transport(limits, plain_http=plain_http) for _ in range(shards)]
        self._turn = itertools.cycle(self.transports)

    async def aclose(self) -> None:
        """Close the connections to the upstream."""
        for transport in self.transports:
            await transport.aclose()

    def _url(self, scope: Scope) -> str:
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else quote(scope["path"], safe="/:@!$&'()*+,;=-._~%")
        query = scope.get("query_string", b"")
        return self.base + path + ("?" + query.decode("latin-1") if query else "")

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        incoming: list[tuple[bytes, bytes]] = scope["headers"]
        dropped = _DROPPED_REQUEST | _connection_tokens(incoming)
        headers: list[tuple[bytes, bytes]] = []
        host = b""
        forwarded_for: list[bytes] = []
        proto = forwarded_host = b""
        for name, value in incoming:
            if name == b"host":
                host = value
            elif name == _FORWARDED_FOR:
                forwarded_for.append(value)
                continue
            elif name == _FORWARDED_PROTO:
                proto = proto or value
                continue
            elif name == _FORWARDED_HOST:
                forwarded_host = forwarded_host or value
                continue
            if name not in dropped:
                headers.append((name, value))
        headers.append((b"host", host if self.preserve_host and host else self.upstream_host))
        client = scope.get("client")
        if client:
            forwarded_for.append(str(client[0]).encode("latin-1"))
        if forwarded_for:
            headers.append((_FORWARDED_FOR, b", ".join(forwarded_for)))
        if not (self.trust_forwarded and proto):
            proto = scope.get("scheme", "http").encode("latin-1")
        headers.append((_FORWARDED_PROTO, proto))
        if not (self.trust_forwarded and forwarded_host):
            forwarded_host = host
        if forwarded_host:
            headers.append((_FORWARDED_HOST, forwarded_host))
        return headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - the proxy app routes only HTTP here
            return
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body: bytes | AsyncIterator[bytes]
        if first.get("more_body", False):
            body = _stream_body(first.get("body", b""), receive)
        else:
            body = first.get("body", b"")
        request = httpx.Request(
            scope["method"],
            self._url(scope),
            headers=self._request_headers(scope),
            content=body,
            extensions={"timeout": self.timeout},
        )
        started = time.perf_counter()
        try:
            response = await next(self._turn).handle_async_request(request)
        except _ClientGone:
            return  # nobody to answer
        except httpx.TimeoutException as exc:
            self._tell(None, "timeout")
            await self._fail(send, 504, "Upstream timed out", f"the upstream did not answer in time ({_name(exc)})")
            return
        except httpx.TransportError as exc:
            self._tell(None, "unreachable")
            logger.warning("idempo proxy: upstream %s failed: %s: %s", self.base, _name(exc), exc)
            await self._fail(send, 502, "Upstream unavailable", f"the upstream could not be reached ({_name(exc)})")
            return
        self._tell(time.perf_counter() - started, None)
        try:
            await self._relay(response, send)
        except httpx.TransportError:
            self._tell(None, "broken")
            raise
        finally:
            await response.aclose()

    async def _relay(self, response: httpx.Response, send: Send) -> None:
        raw = response.headers.raw
        dropped = HOP_BY_HOP | _connection_tokens(raw)
        headers = [(name.lower(), value) for name, value in raw if name.lower() not in dropped]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async for chunk in response.aiter_raw():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _tell(self, seconds: float | None, reason: str | None) -> None:
        if self.observe is not None:
            try:
                self.observe(seconds, reason)
            except Exception:
                logger.exception("idempo proxy: an upstream observer failed")

    async def _fail(self, send: Send, status: int, title: str, detail: str) -> None:
        slug = "upstream-timeout" if status == 504 else "upstream-unavailable"
        problem = Problem(self.problem_base + slug, title, status, detail)
        status, headers, body = problem.render()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _name(exc: BaseException) -> str:
    return type(exc).__name__


async def _stream_body(first: bytes, receive: Receive) -> AsyncIterator[bytes]:
    """The request body as the client sends it."""
    if first:
        yield first
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
