"""The proxy's ASGI application in-process: the forwarding rules, upstream failures, its own endpoints, logs and
metrics, with the upstream an ``httpx.MockTransport`` that records what it was sent.

(The same application under uvicorn, with real processes on both sides, is ``test_proxy_e2e.py``.)
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from idempo import IdempotencyMiddleware, MemoryStore, StoreError
from idempo.metrics import PrometheusObserver
from idempo.proxy import HOP_BY_HOP, ProxyApp, ProxyConfig, create_app
from idempo.proxy._intake import Refusal, request_target

UPSTREAM = "http://upstream.internal:8000/base"
PROBLEM = "application/problem+json"
Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Upstream:
    """A mock upstream: what it was sent, and how it answers (a 201 echo by default)."""

    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    answer: Callable[[httpx.Request], httpx.Response] | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        self.requests.append(request)
        response = (
            self.answer(request) if self.answer is not None else httpx.Response(201, json={"n": len(self.requests)})
        )
        if isinstance(response.stream, httpx.ByteStream):  # read at once: made a stream again, as a server's is
            response = httpx.Response(response.status_code, headers=response.headers, stream=response.stream)
        return response


@dataclass
class Proxied:
    app: ProxyApp
    upstream: Upstream
    client: httpx.AsyncClient


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def make(upstream: Upstream) -> Callable[..., Any]:
    """Build a proxy app in front of the mock upstream, with a client that sends exactly what each test says."""

    async def build(**options: Any) -> Proxied:
        config = ProxyConfig(upstream=UPSTREAM, store="memory://", **options)
        app = create_app(config, transport=httpx.MockTransport(upstream.handle))
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("192.0.2.10", 5000)), base_url="http://proxy.example:8080"
        )
        for default in ("accept", "accept-encoding", "user-agent", "connection"):
            client.headers.pop(default, None)
        return Proxied(app, upstream, client)

    return build


@pytest.fixture
async def proxied(make: Callable[..., Any]) -> AsyncIterator[Proxied]:
    p: Proxied = await make()
    yield p
    await p.client.aclose()
    await p.app.aclose()


CLIENT_FORWARDING = {
    "X-Forwarded-For": "198.51.100.1, 198.51.100.2",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "shop.example",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/admin",
    "X-Forwarded-Server": "edge-1",
    "Forwarded": "for=198.51.100.1;proto=https",
    "X-Real-IP": "198.51.100.1",
    "True-Client-IP": "198.51.100.1",
    "X-Original-URL": "/admin/delete",
}
"""Forwarding headers a client may send about itself (or a proxy in front, when it is trusted)."""


def header_names(request: httpx.Request) -> list[str]:
    return [name.decode().lower() for name, _ in request.headers.raw]


# -- forwarding ---------------------------------------------------------------------------------------------------


async def test_the_request_is_forwarded_with_hop_by_hop_headers_dropped_and_forwarding_headers_set(
    proxied: Proxied,
) -> None:
    response = await proxied.client.post(
        "/orders/a%2Fb?x=1&y=%20",
        content=b"body",
        headers={
            "Connection": "close, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Sum",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic eA==",
            "Proxy-Connection": "keep-alive",
            "Expect": "100-continue",
            **CLIENT_FORWARDING,
            "Authorization": "Bearer t",
            "Accept-Encoding": "br",
        },
    )
    assert response.status_code == 201
    (sent,) = proxied.upstream.requests
    assert str(sent.url) == "http://upstream.internal:8000/base/orders/a%2Fb?x=1&y=%20"
    names = header_names(sent)
    for hop in [*(name.decode() for name in HOP_BY_HOP), "x-secret-hop", "expect"]:
        assert hop not in names, hop
    assert sent.headers["host"] == "proxy.example:8080"
    # The client's claims about itself are dropped; what this hop knows is set.
    for claimed in CLIENT_FORWARDING:
        if claimed.lower() not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
            assert claimed.lower() not in names, claimed
    assert sent.headers["x-forwarded-for"] == "192.0.2.10"
    assert sent.headers["x-forwarded-proto"] == "http"
    assert sent.headers["x-forwarded-host"] == "proxy.example:8080"
    assert sent.headers["authorization"] == "Bearer t"
    assert sent.headers["accept-encoding"] == "br"  # the client's, as sent
    assert "user-agent" not in names  # httpx adds nothing of its own
    assert proxied.upstream.bodies == [b"body"]


async def test_no_accept_encoding_is_added(proxied: Proxied) -> None:
    await proxied.client.get("/")
    assert "accept-encoding" not in header_names(proxied.upstream.requests[0])


async def test_host_header_upstream_and_trusted_forwarding_headers(make: Callable[..., Any]) -> None:
    proxied: Proxied = await make(host_header="upstream", trust_forwarded=True)
    try:
        await proxied.client.get("/", headers=CLIENT_FORWARDING)
        await proxied.client.get("/")
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()
    trusted, plain = proxied.upstream.requests
    assert trusted.headers["host"] == plain.headers["host"] == "upstream.internal:8000"
    assert trusted.headers["x-forwarded-for"] == "198.51.100.1, 198.51.100.2, 192.0.2.10"  # appended to
    assert trusted.headers["x-forwarded-proto"] == "https"
    assert trusted.headers["x-forwarded-host"] == "shop.example"
    for name, value in CLIENT_FORWARDING.items():  # the rest kept as the proxy in front set them
        if not name.lower().startswith(("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")):
            assert trusted.headers[name] == value, name
    assert plain.headers["x-forwarded-proto"] == "http"
    assert plain.headers["x-forwarded-host"] == "proxy.example:8080"


async def test_the_response_is_relayed_raw_without_hop_by_hop_headers(proxied: Proxied) -> None:
    compressed = gzip.compress(b'{"big": "payload"}' * 100, mtime=0)
    proxied.upstream.answer = lambda request: httpx.Response(
        200,
        headers=[
            ("Content-Encoding", "gzip"),
            ("Content-Length", str(len(compressed))),
            ("Connection", "keep-alive, X-Upstream-Hop"),
            ("X-Upstream-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Upgrade", "h2c"),
            ("Trailer", "X-Sum"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ],
        content=compressed,
    )
    async with proxied.client.stream("GET", "/") as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert raw == compressed  # never decompressed
    names = [name.decode().lower() for name, _ in response.headers.raw]
    for hop in ("connection", "x-upstream-hop", "keep-alive", "proxy-authenticate", "upgrade", "trailer"):
        assert hop not in names, hop
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(compressed))
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]


# -- the upstream fails -------------------------------------------------------------------------------------------


def metric(app: ProxyApp, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(app.observer.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# Failures that prove the request never left (the key is released: a retry runs), and those after which the upstream
# may have it (the outcome is unknown: the key is kept, and retries get 503 outcome-unknown).
NEVER_SENT: dict[type[httpx.TransportError], tuple[int, str]] = {
    httpx.ConnectError: (502, "unreachable"),
    httpx.ConnectTimeout: (504, "timeout"),
    httpx.PoolTimeout: (504, "timeout"),
    httpx.UnsupportedProtocol: (502, "unreachable"),
}
MAY_HAVE_LEFT: dict[type[httpx.TransportError], tuple[int, str]] = {
    httpx.ReadTimeout: (504, "timeout"),
    httpx.WriteTimeout: (504, "timeout"),
    httpx.ReadError: (502, "unreachable"),
    httpx.WriteError: (502, "unreachable"),
    httpx.CloseError: (502, "unreachable"),
    httpx.RemoteProtocolError: (502, "unreachable"),
    httpx.LocalProtocolError: (502, "unreachable"),
    httpx.ProxyError: (502, "unreachable"),
}


def _subclasses(cls: type[httpx.TransportError]) -> set[type[httpx.TransportError]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_every_transport_error_of_httpx_is_classified() -> None:
    """A new exception class in httpx must be sorted into "never sent" or "may have left" here (and in _forward)."""
    concrete = {cls for cls in _subclasses(httpx.TransportError) if not cls.__subclasses__()}
    assert concrete == set(NEVER_SENT) | set(MAY_HAVE_LEFT)


@pytest.mark.parametrize(("error", "expected"), NEVER_SENT.items(), ids=lambda v: getattr(v, "__name__", ""))
async def test_a_request_that_never_left_is_a_problem_document_and_releases_the_key(
    proxied: Proxied, error: type[httpx.TransportError], expected: tuple[int, str]
) -> None:
    status, reason = expected

    def fail(request: httpx.Request) -> httpx.Response:
        raise error("no connection")

    proxied.upstream.answer = fail
    headers = {"Idempotency-Key": "k1"}
    response = await proxied.client.post("/pay", content=b"x", headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    document = response.json()
    assert document["status"] == status
    assert document["type"].endswith("upstream-timeout" if status == 504 else "upstream-unavailable")
    assert metric(proxied.app, "idempo_proxy_upstream_errors_total", reason=reason) == 1

    proxied.upstream.answer = None  # the upstream is back: the retry runs (the key was released)
    retry = await proxied.client.post("/pay", content=b"x", headers=headers)
    assert retry.status_code == 201
    assert len(proxied.upstream.requests) == 2


@pytest.mark.parametrize(("error", "expected"), MAY_HAVE_LEFT.items(), ids=lambda v: getattr(v, "__name__", ""))
async def test_a_request_that_may_have_reached_the_upstream_keeps_the_key_as_outcome_unknown(
    make: Callable[..., Any], error: type[httpx.TransportError], expected: tuple[int, str]
) -> None:
    status, reason = expected
    proxied: Proxied = await make(unknown_outcome_ttl=90)

    def fail(request: httpx.Request) -> httpx.Response:
        raise error("after the request was sent")

    proxied.upstream.answer = fail
    headers = {"Idempotency-Key": "k1"}
    try:
        response = await proxied.client.post("/pay", content=b"x", headers=headers)
        assert response.status_code == status  # what the client gets is unchanged
        assert response.json()["type"].endswith("upstream-timeout" if status == 504 else "upstream-unavailable")
        assert "outcome is unknown" in response.json()["detail"]
        assert metric(proxied.app, "idempo_proxy_upstream_errors_total", reason=reason) == 1
        proxied.upstream.answer = None  # the upstream answers again: the retry still must not run the operation
        retry = await proxied.client.post("/pay", content=b"x", headers=headers)
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()
    assert retry.status_code == 503
    assert retry.json()["type"].endswith("outcome-unknown")
    assert 0 < int(retry.headers["retry-after"]) <= 90
    assert len(proxied.upstream.requests) == 1


async def test_an_upstream_that_breaks_mid_body_aborts_the_response_and_keeps_the_key(proxied: Proxied) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"partial"
            raise httpx.ReadError("connection reset")

    proxied.upstream.answer = lambda request: httpx.Response(200, stream=Broken())
    with pytest.raises(httpx.ReadError):
        await proxied.client.post("/pay", headers={"Idempotency-Key": "k2"})
    assert metric(proxied.app, "idempo_proxy_upstream_errors_total", reason="broken") == 1
    proxied.upstream.answer = None
    retry = await proxied.client.post("/pay", headers={"Idempotency-Key": "k2"})
    assert retry.status_code == 503  # it ran; what it answered is lost: never run again
    assert retry.json()["type"].endswith("outcome-unknown")
    assert len(proxied.upstream.requests) == 1


async def test_an_exchange_cancelled_while_the_upstream_holds_it_keeps_the_key(upstream: Upstream) -> None:
    entered = asyncio.Event()

    async def hold(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()  # the upstream never answers
        raise AssertionError("unreachable")

    app = create_app(ProxyConfig(upstream=UPSTREAM, store="memory://"), transport=httpx.MockTransport(hold))
    scope = {
        "type": "http", "method": "POST", "path": "/pay", "raw_path": b"/pay", "query_string": b"",
        "headers": [(b"host", b"proxy"), (b"idempotency-key", b"k"), (b"content-length", b"1")],
        "scheme": "http", "client": None, "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": b"x", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    task = asyncio.create_task(app(scope, receive, send))
    await entered.wait()
    task.cancel()  # a server shutting down, say: the upstream may have the request
    with pytest.raises(asyncio.CancelledError):
        await task
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
        retry = await client.post("/pay", content=b"x", headers={"Idempotency-Key": "k"})
    await app.aclose()
    assert retry.status_code == 503
    assert retry.json()["type"].endswith("outcome-unknown")


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"raw_path": b"/a/b", "query_string": b"x=1"}, b"/a/b?x=1"),
        ({"raw_path": b"/a%2Fb/%2e%2e%2e/.well-known"}, b"/a%2Fb/%2e%2e%2e/.well-known"),
        ({"raw_path": b"//host/x"}, b"//host/x"),
        ({"path": "/a b/50%", "raw_path": None}, b"/a%20b/50%25"),  # a server that gives no raw_path
        ({"raw_path": b"@host:1/x"}, 400),
        ({"raw_path": b"http://host/x"}, 400),
        ({"raw_path": b"*"}, 400),
        ({"raw_path": b"host:443"}, 400),
        ({"raw_path": b"/a/./b"}, 400),
        ({"raw_path": b"/a/.."}, 400),
        ({"raw_path": b"/a/%2E%2e/b"}, 400),
        ({"raw_path": b"/a/.;x/b"}, 400),
        ({"raw_path": b"/a\\..\\b"}, 400),
        ({"path": "/a/../b", "raw_path": None}, 400),
    ],
)
def test_request_target(scope: dict[str, Any], expected: bytes | int) -> None:
    """Only origin-form paths without dot segments are targets; the rest is refused, with a 400."""
    target = request_target({"path": "/", "query_string": b"", **scope})
    if isinstance(expected, int):
        assert isinstance(target, Refusal)
        assert target.status == expected
    else:
        assert target == expected


async def test_a_client_that_leaves_while_its_body_streams_gets_nothing_and_breaks_nothing(proxied: Proxied) -> None:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"first part", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/upload", "raw_path": b"/upload", "query_string": b"",
        "headers": [(b"host", b"proxy"), (b"transfer-encoding", b"chunked")], "scheme": "http", "client": None,
    }  # fmt: skip
    await proxied.app(scope, receive, send)
    assert sent == []  # nobody to answer
    assert proxied.upstream.requests == []  # the upstream never got a whole request


# -- the store fails ----------------------------------------------------------------------------------------------


class DownStore(MemoryStore):
    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, **options: Any) -> Any:
        raise StoreError("down")


@pytest.mark.parametrize(("mode", "status", "calls"), [("fail_closed", 503, 0), ("fail_open", 201, 1)])
async def test_a_store_failure_fails_closed_or_open(upstream: Upstream, mode: str, status: int, calls: int) -> None:
    config = ProxyConfig(upstream=UPSTREAM, on_store_error=mode)  # type: ignore[arg-type]
    app = create_app(config, store=DownStore(), transport=httpx.MockTransport(upstream.handle))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
        response = await client.post("/pay", headers={"Idempotency-Key": "k"})
    await app.aclose()
    assert response.status_code == status
    assert len(upstream.requests) == calls
    assert metric(app, "idempo_requests_total", outcome="store_error") == 1


# -- the proxy's own endpoints, logs, principal -----------------------------------------------------------------


async def test_own_endpoints_never_reach_the_upstream(proxied: Proxied) -> None:
    health = await proxied.client.get("/_idempo/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert (await proxied.client.head("/_idempo/healthz")).content == b""
    refused = await proxied.client.post("/_idempo/metrics")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    metrics = await proxied.client.get("/_idempo/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "idempo_requests_total" in metrics.text
    assert proxied.upstream.requests == []
    # Anything else under the prefix is the upstream's.
    assert (await proxied.client.get("/_idempo/other")).status_code == 201
    assert metric(proxied.app, "idempo_requests_total", outcome="passthrough") == 1


async def test_a_prefix_of_ones_own(make: Callable[..., Any]) -> None:
    proxied: Proxied = await make(prefix="/-/proxy/")
    try:
        assert (await proxied.client.get("/-/proxy/healthz")).json()["status"] == "ok"
        assert (await proxied.client.get("/_idempo/healthz")).status_code == 201  # the upstream's now
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("idempo.proxy.access")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_one_json_line_per_forwarded_request(proxied: Proxied, access_lines: Lines) -> None:
    await proxied.client.post("/pay?secret=1", content=b"a", headers={"Idempotency-Key": "k"})
    await proxied.client.post("/pay?secret=1", content=b"a", headers={"Idempotency-Key": "k"})
    await proxied.client.post("/pay?secret=1", content=b"b", headers={"Idempotency-Key": "k"})
    await proxied.client.get("/_idempo/healthz")  # not logged
    lines = access_lines.lines
    assert [(line["method"], line["path"], line["status"], line["outcome"]) for line in lines] == [
        ("POST", "/pay", 201, "executed"),
        ("POST", "/pay", 201, "replayed"),
        ("POST", "/pay", 422, "mismatch"),
    ]
    for line in lines:
        assert line["client"] == "192.0.2.10"
        assert isinstance(line["duration_ms"], float)
        assert set(line) == {"ts", "method", "path", "status", "outcome", "duration_ms", "client", "pid"}


async def test_access_log_off(make: Callable[..., Any], access_lines: Lines) -> None:
    proxied: Proxied = await make(access_log=False)
    try:
        await proxied.client.get("/")
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()
    assert access_lines.lines == []


async def test_a_principal_header_namespaces_records(make: Callable[..., Any]) -> None:
    proxied: Proxied = await make(principal_header="X-User")
    try:
        for user in ("alice", "bob", "alice"):
            await proxied.client.post("/pay", headers={"Idempotency-Key": "same", "X-User": user})
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()
    assert len(proxied.upstream.requests) == 2  # alice once, bob once; alice's retry replayed


async def test_lifespan_shutdown_closes_the_store_and_the_upstream_connections(upstream: Upstream) -> None:
    closed: list[str] = []

    class Store(MemoryStore):
        async def close(self) -> None:
            closed.append("store")
            await super().close()

    class Transport(httpx.MockTransport):
        async def aclose(self) -> None:
            closed.append("transport")

    app = create_app(ProxyConfig(upstream=UPSTREAM), store=Store(), transport=Transport(upstream.handle))
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert sorted(closed) == ["store", "transport"]


async def test_lifespan_shutdown_waits_for_outcomes_still_being_recorded(upstream: Upstream) -> None:
    """The store failed the completion of a request that was forwarded: the outcome is being tried again in the
    background when the proxy is told to shut down. It lands before the store is closed."""
    happened: list[str] = []

    class Store(MemoryStore):
        failed = False

        async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
            if not self.failed:
                self.failed = True
                raise StoreError("the store is down")
            happened.append("recorded")
            return await super().complete(key, token, payload, ttl=ttl)

        async def close(self) -> None:
            happened.append("store closed")
            await super().close()

    app = create_app(ProxyConfig(upstream=UPSTREAM), store=Store(), transport=httpx.MockTransport(upstream.handle))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy.example:8080") as client:
        response = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert response.status_code == 201
    assert happened == []  # the completion failed; it is being tried again
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.shutdown"}

    async def send(message: Any) -> None:
        sent.append(message["type"])

    async with asyncio.timeout(10):
        await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.shutdown.complete"]
    assert happened == ["recorded", "store closed"]
    assert len(upstream.requests) == 1


# -- idempo.metrics for middleware users ------------------------------------------------------------------------


async def test_the_prometheus_observer_counts_outcomes_and_times_store_calls() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    observer = PrometheusObserver(namespace="shop")
    wrapped = IdempotencyMiddleware(app, store=MemoryStore(), observer=observer)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
        await client.post("/", headers={"Idempotency-Key": "a"})
        await client.post("/", headers={"Idempotency-Key": "a"})
        await client.get("/")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(observer.exposition().decode())
        for s in family.samples
    }
    assert samples[("shop_requests_total", (("outcome", "executed"),))] == 1
    assert samples[("shop_requests_total", (("outcome", "replayed"),))] == 1
    assert samples[("shop_requests_total", (("outcome", "passthrough"),))] == 1
    assert samples[("shop_requests_total", (("outcome", "conflict"),))] == 0  # every outcome, from the start
    assert samples[("shop_store_call_seconds_count", (("operation", "claim"),))] == 2
    assert samples[("shop_store_call_seconds_count", (("operation", "complete"),))] == 1
    observer.on_store_call("claim", 0.5, StoreError("x"))
    assert b'shop_store_call_errors_total{operation="claim"} 1.0' in observer.exposition()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_without_prometheus_client_the_core_imports_and_metrics_names_the_extra() -> None:
    hide = "import sys; sys.modules['prometheus_client'] = None; "
    assert _python(hide + "import idempo, idempo.asgi").returncode == 0
    result = _python(hide + "import idempo.metrics")
    assert result.returncode == 1
    assert "MissingDependency" in result.stderr
    assert "pip install 'idempo[metrics]'" in result.stderr


def test_without_httpx_the_configuration_loads_and_the_app_names_the_extra() -> None:
    hide = "import sys; sys.modules['httpx'] = None; "
    assert _python(hide + "from idempo.proxy import load_config, ProxyConfig").returncode == 0
    result = _python(hide + "from idempo.proxy import create_app")
    assert "MissingDependency" in result.stderr
    assert "pip install 'idempo[cli]'" in result.stderr


@pytest.mark.parametrize("module", ["httpx", "uvicorn", "prometheus_client"])
def test_without_the_cli_extra_the_command_says_what_to_install(module: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None; from idempo._cli import main; "
        "sys.exit(main(['proxy', '--upstream', 'http://127.0.0.1:9', '--store', 'memory://', "
        "'--listen', '127.0.0.1:0']))"
    )
    result = _python(code)
    assert result.returncode == 1, result.stderr
    assert "pip install 'idempo[cli]'" in result.stderr
    assert "Traceback" not in result.stderr


# -- every middleware option reaches the middleware ---------------------------------------------------------------


async def test_every_middleware_option_reaches_the_middleware(upstream: Upstream) -> None:
    config = ProxyConfig(
        upstream=UPSTREAM,
        ttl=77,
        lease=9,
        header="X-Key",
        methods=("post", "delete"),
        require_key=True,
        canonical_json=True,
        on_conflict="wait",
        wait_timeout=3,
        on_store_error="fail_open",
        retry_after=4,
        max_request_bytes=1000,
        max_response_bytes=2000,
        unknown_outcome_ttl=33,
        store_server_errors=True,
        replay_set_cookie=True,
        problem_base_uri="https://errors.example/",
        cache_size=10,
        cache_ttl=5,
    )
    app = create_app(config, store=MemoryStore(), transport=httpx.MockTransport(upstream.handle))
    middleware = app.middleware
    await app.aclose()
    expected = {
        "ttl": 77,
        "lease": 9,
        "header": "X-Key",
        "methods": frozenset({"POST", "DELETE"}),
        "require_key": True,
        "canonical_json": True,
        "on_conflict": "wait",
        "wait_timeout": 3,
        "on_store_error": "fail_open",
        "retry_after": 4,
        "max_request_bytes": 1000,
        "max_response_bytes": 2000,
        "unknown_outcome_ttl": 33,
        "store_server_errors": True,
        "replay_set_cookie": True,
        "problem_base_uri": "https://errors.example/",
        "cache_size": 10,
        "cache_ttl": 5,
    }
    assert middleware.policy is config.policy  # the one policy, not options copied one by one
    assert {name: getattr(middleware.policy, name) for name in expected} == expected
    assert middleware.cache is not None


async def test_store_server_errors_and_replay_set_cookie_through_the_proxy(make: Callable[..., Any]) -> None:
    proxied: Proxied = await make(store_server_errors=True, replay_set_cookie=True)
    proxied.upstream.answer = lambda request: httpx.Response(500, headers={"Set-Cookie": "s=1"}, content=b"boom")
    try:
        first = await proxied.client.post("/pay", headers={"Idempotency-Key": "k"})
        second = await proxied.client.post("/pay", headers={"Idempotency-Key": "k"})
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()
    assert first.status_code == second.status_code == 500
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["set-cookie"] == "s=1"
    assert second.content == b"boom"
    assert len(proxied.upstream.requests) == 1


async def test_require_key_paths_through_the_proxy(make: Callable[..., Any]) -> None:
    proxied: Proxied = await make(require_key_paths=("/payments/", "/orders/*"))
    try:
        statuses = [(await proxied.client.post(path)).status_code for path in ("/payments/1", "/orders/2", "/other")]
    finally:
        await proxied.client.aclose()
        await proxied.app.aclose()
    assert statuses == [400, 400, 201]
    assert len(proxied.upstream.requests) == 1
