"""The forwarding app: an ASGI application that sends each request on to the upstream with httpx, and streams the
upstream's response back. It knows nothing of idempotency; the middleware wraps it. Strictly private.

Theory of operation. The upstream URL is built structurally, from the configured upstream's scheme, host, port and
base path and the request's target as ``ProxyApp`` checked it (``UPSTREAM_URL`` in the scope): never by joining
strings, so that no target can name another host. The headers are rewritten (hop-by-hop headers dropped, ``Host``
and the forwarding headers set, ``Content-Length`` the length of the body actually sent), and the body is streamed to
the upstream as the client sends it (a keyed request's body arrives in one piece, buffered by the middleware). Once
the upstream's status and headers arrive they are sent on (hop-by-hop headers dropped), then its body, chunk by
chunk, as raw bytes: never decoded nor decompressed, so a ``Content-Encoding`` and a ``Content-Length`` stay true.

Failures, and what they mean for the key. A request that provably never left (no connection could be made, or none
was free in the pool) is a 502 or 504 problem, and the middleware releases the key: a retry runs. Once the request
may have reached the upstream (it timed out waiting for the answer, the connection broke while the request was
being written or the answer read, the answer broke off in its body, or the exchange was cancelled), the operation
may have taken effect: the outcome is marked unknown (:func:`~idempo.mark_outcome_unknown`), so that the middleware
keeps the key and answers retries 503 ``outcome-unknown`` instead of running the operation a second time. The client
still gets the 504 or 502 (or, if the response had started, a connection aborted by the server).

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

import httpx

from .._core.outcome import mark_outcome_unknown
from .._core.problem import Problem
from ..asgi import Message, Receive, Scope, Send
from ._config import ProxyConfig
from ._network import http_transport

__all__ = ["FORWARDING_HEADERS", "HOP_BY_HOP", "UPSTREAM_URL", "ForwardingApp", "UpstreamObserver"]

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

FORWARDING_HEADERS: Final = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"front-end-https",
        b"x-url-scheme",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-original-forwarded-for",
    }
)
"""Headers by which a proxy in front tells who the client is or what it asked for. Without ``trust_forwarded`` the
client's own are dropped, as is every ``X-Forwarded-*`` header, and the proxy sets ``X-Forwarded-For``,
``-Proto`` and ``-Host`` from what it knows."""

UPSTREAM_URL: Final = "idempo.proxy.upstream_url"
"""The scope key under which ``ProxyApp`` leaves the upstream URL it built from the checked request target."""

_DROPPED_REQUEST: Final = HOP_BY_HOP | {b"host", b"expect", b"content-length"}
_POOL_SHARDS: Final = 8
# Idle connections are dropped after 4 s: before the upstream drops them itself (uvicorn's and Node's servers after
# 5 s). A request written onto a connection the upstream is closing at that instant may or may not have been read,
# and would have an unknown outcome: better the proxy never reuses a connection so close to its end.
_KEEPALIVE_EXPIRY: Final = 4.0
_FORWARDED_FOR: Final = b"x-forwarded-for"
_FORWARDED_PROTO: Final = b"x-forwarded-proto"
_FORWARDED_HOST: Final = b"x-forwarded-host"
_X_FORWARDED: Final = b"x-forwarded-"
# Failures that prove the request never left: no connection was made, or none was free. Every other failure of an
# exchange may come after the upstream got (some of) the request.
_NEVER_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

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
        upstream = httpx.URL(config.upstream)
        self.scheme = upstream.scheme
        self.host = upstream.host
        self.port = upstream.port
        self.base_path = upstream.raw_path.rstrip(b"/")
        self.base = config.upstream.rstrip("/")  # for logs
        self.upstream_host = upstream.netloc
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
            limits = httpx.Limits(
                max_connections=size, max_keepalive_connections=size, keepalive_expiry=_KEEPALIVE_EXPIRY
            )
            plain_http = self.scheme == "http"
            self.transports = [http_transport(limits, plain_http=plain_http) for _ in range(shards)]
        self._turn = itertools.cycle(self.transports)

    async def aclose(self) -> None:
        """Close the connections to the upstream."""
        for transport in self.transports:
            await transport.aclose()

    def url(self, target: bytes) -> httpx.URL:
        """The upstream URL for a request *target* (an origin-form path and query, checked): the upstream's scheme,
        host and port, and its base path followed by the target.

        Raises:
            httpx.InvalidURL: the target holds what a URL cannot (a ``#``).
            UnicodeDecodeError: the target is not ASCII.
        """
        return httpx.URL(scheme=self.scheme, host=self.host, port=self.port, raw_path=self.base_path + target)

    def _request_headers(self, scope: Scope, body: bytes | None) -> list[tuple[bytes, bytes]]:
        """The headers sent upstream; *body* is the whole body when it is known, ``None`` when it streams."""
        incoming: list[tuple[bytes, bytes]] = scope["headers"]
        dropped = _DROPPED_REQUEST | _connection_tokens(incoming)
        trust = self.trust_forwarded
        headers: list[tuple[bytes, bytes]] = []
        host = content_length = b""
        forwarded_for: list[bytes] = []
        proto = forwarded_host = b""
        for name, value in incoming:
            if name == b"host":
                host = value
            elif name == b"content-length":
                content_length = value
            elif name.startswith(_X_FORWARDED) or name in FORWARDING_HEADERS:
                if not trust:
                    continue  # the client's claim about itself: replaced by what this hop knows
                if name == _FORWARDED_FOR:
                    forwarded_for.append(value)
                    continue
                if name == _FORWARDED_PROTO:
                    proto = proto or value
                    continue
                if name == _FORWARDED_HOST:
                    forwarded_host = forwarded_host or value
                    continue
            if name not in dropped:
                headers.append((name, value))
        # The length of the body actually sent: of a whole body, counted; of a streamed one, the client's, by which
        # the server framed it (a Transfer-Encoding beside it was refused before).
        if body is not None:
            if body or content_length:
                headers.append((b"content-length", str(len(body)).encode("ascii")))
        elif content_length:
            headers.append((b"content-length", content_length))
        headers.append((b"host", host if self.preserve_host and host else self.upstream_host))
        client = scope.get("client")
        if client:
            forwarded_for.append(str(client[0]).encode("latin-1"))
        if forwarded_for:
            headers.append((_FORWARDED_FOR, b", ".join(forwarded_for)))
        if not proto:
            proto = scope.get("scheme", "http").encode("latin-1")
        headers.append((_FORWARDED_PROTO, proto))
        if not forwarded_host:
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
            whole = None
        else:
            body = whole = first.get("body", b"")
        request = httpx.Request(
            scope["method"],
            scope[UPSTREAM_URL],
            headers=self._request_headers(scope, whole),
            content=body,
            extensions={"timeout": self.timeout},
        )
        started = time.perf_counter()
        try:
            response = await next(self._turn).handle_async_request(request)
        except _ClientGone:
            return  # nobody to answer
        except _NEVER_SENT as exc:  # the request never left: the key is released, and a retry runs
            if isinstance(exc, httpx.TimeoutException):
                self._tell(None, "timeout")
                await self._fail(
                    send, 504, "Upstream timed out", f"no connection to the upstream in time ({_name(exc)})"
                )
                return
            self._tell(None, "unreachable")
            logger.warning("idempo proxy: upstream %s failed: %s: %s", self.base, _name(exc), exc)
            await self._fail(send, 502, "Upstream unavailable", f"the upstream could not be reached ({_name(exc)})")
            return
        except httpx.TransportError as exc:
            mark_outcome_unknown()  # the upstream may have the request: its outcome is unknown, not "did not happen"
            unknown = "the request may have reached it, so its outcome is unknown"
            if isinstance(exc, httpx.TimeoutException):
                self._tell(None, "timeout")
                await self._fail(send, 504, "Upstream timed out", f"the upstream did not answer in time; {unknown}")
                return
            self._tell(None, "unreachable")
            logger.warning("idempo proxy: upstream %s failed mid-exchange: %s: %s", self.base, _name(exc), exc)
            await self._fail(
                send, 502, "Upstream unavailable", f"the upstream connection broke ({_name(exc)}); {unknown}"
            )
            return
        except BaseException:
            mark_outcome_unknown()  # cancelled while the upstream may hold the request
            raise
        self._tell(time.perf_counter() - started, None)
        try:
            await self._relay(response, send)
        except BaseException as exc:
            # The upstream answered, but its response could not be passed on whole: what happened is not known.
            mark_outcome_unknown()
            if isinstance(exc, httpx.TransportError):
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
