"""The proxy as one ASGI application: its own endpoints, access logs and metrics around
``IdempotencyMiddleware(ForwardingApp)``. Strictly private; :func:`idempo.proxy.create_app` is the public way in.

Each request goes one of two ways. The proxy's own endpoints, ``healthz`` and ``metrics`` under its prefix
(``/_idempo/`` by default), are answered here and never reach the middleware nor the upstream: on the public listener,
or, with ``admin_listen``, only on that second listener (which answers nothing else, and is told apart by the local
address of the connection, ``scope["server"]``). Every other request is checked (``._intake``: its target, its
framing; ``OPTIONS *`` is answered here), then goes through the middleware to the forwarding app; its status, the
middleware's outcome (learnt from the observer hook) and its duration make one JSON line on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Final

import httpx

from .._core.errors import StoreError
from .._core.problem import Problem
from ..asgi import IdempotencyMiddleware, Message, Receive, Scope, Send, authorization_principal
from ..observe import Outcome, StoreOperation
from ..stores import Store, redact, store_from_url
from ._config import CONFIG_ENV, ProxyConfig, parse_listen
from ._forward import UPSTREAM_URL, ForwardingApp
from ._intake import OVER_BUDGET, BodyBudget, KeyedBody, Refusal, framing_refusal, request_target

__all__ = ["ProxyApp", "app_from_environment", "create_app"]

_OUTCOME: Final = "idempo.proxy.outcome"  # the scope key where the observer leaves the outcome, for the access log
_UPSTREAM_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

access_logger = logging.getLogger("idempo.proxy.access")


class _JSONLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


def _access_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONLines())
    return handler


class _Observer:
    """The middleware's observer in the proxy: the Prometheus metrics, plus the outcome kept in the scope for the
    access log. Strictly private."""

    __slots__ = ("prometheus",)

    def __init__(self, prometheus: Any) -> None:
        self.prometheus = prometheus

    def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
        scope[_OUTCOME] = outcome
        self.prometheus.on_request(outcome, scope)

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        self.prometheus.on_store_call(operation, seconds, error)


class ProxyApp:
    """The ``idempo proxy`` application (see :func:`create_app`)."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        store: Store | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from ..metrics import PrometheusObserver

        self.config = config
        self.store = store if store is not None else store_from_url(config.store)
        self.observer = PrometheusObserver()
        registry = self.observer.registry
        self.upstream_seconds = Histogram(
            "upstream_seconds",
            "Time until the upstream's response headers arrived",
            namespace="idempo_proxy",
            registry=registry,
            buckets=_UPSTREAM_BUCKETS,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Upstream exchanges that failed: unreachable (502), timeout (504), broken (cut off mid-response)",
            ["reason"],
            namespace="idempo_proxy",
            registry=registry,
        )
        self.responses = Counter(
            "responses",
            "Responses the proxy sent for forwarded paths, by status class",
            ["code"],
            namespace="idempo_proxy",
            registry=registry,
        )
        for reason in ("unreachable", "timeout", "broken"):
            self.upstream_errors.labels(reason)
        buffered = Gauge(
            "buffered_bytes",
            "Bytes of keyed request bodies held in memory (buffered, then forwarded)",
            namespace="idempo_proxy",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.forward = ForwardingApp(config, transport=transport, observe=self._upstream_observed)
        principal = authorization_principal
        if config.principal_header.lower() != "authorization":
            principal = _header_principal(config.principal_header)
        self.middleware = IdempotencyMiddleware(
            self.forward,
            store=self.store,
            policy=config.policy,
            principal=principal,
            observer=_Observer(self.observer),
        )
        self.healthz_path = config.prefix + "healthz"
        self.metrics_path = config.prefix + "metrics"
        self.admin_port = parse_listen(config.admin_listen)[1] if config.admin_listen else None
        self.methods = frozenset(config.methods)
        self.key_header = config.header.lower().encode("latin-1")
        self.budget = BodyBudget(config.max_buffered_bytes, buffered)
        self.access_log = config.access_log
        if config.access_log and not access_logger.handlers:
            access_logger.addHandler(_access_handler())
            access_logger.setLevel(logging.INFO)
            access_logger.propagate = False
        self._pid = os.getpid()
        self._health = json.dumps({"status": "ok", "pid": self._pid}).encode()

    def _upstream_observed(self, seconds: float | None, reason: str | None) -> None:
        if seconds is not None:
            self.upstream_seconds.observe(seconds)
        if reason is not None:
            self.upstream_errors.labels(reason).inc()

    async def aclose(self) -> None:
        """Wait for the outcomes still being recorded (``IdempotencyMiddleware.finish_recording``), then close the
        upstream connections and the store."""
        try:
            await self.middleware.finish_recording()
            await self.forward.aclose()
        finally:
            await self.store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if self.admin_port is not None and _local_port(scope) == self.admin_port:
                await self._admin(scope, send, path)
            elif self.admin_port is None and (path == self.healthz_path or path == self.metrics_path):
                await self._own(scope, send, path)
            else:
                await self._forward(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # not proxied: refuse the handshake (the server answers 403)
            await send({"type": "websocket.close", "code": 1008})

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self._handle(scope, receive, send_and_note)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.responses.labels(f"{status // 100}xx" if status else "none").inc()
            if self.access_log:
                record: dict[str, Any] = {
                    "ts": round(time.time(), 3),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "outcome": scope.get(_OUTCOME, "passthrough"),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": scope["client"][0] if scope.get("client") else None,
                    "pid": self._pid,
                }
                if error is not None:
                    record["error"] = type(error).__name__
                access_logger.info(json.dumps(record, separators=(",", ":")))

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request, then hand it to the middleware (with a deadline and a budget for a keyed body)."""
        if scope["method"] == "OPTIONS" and (scope.get("raw_path") or scope["path"].encode("latin-1")) == b"*":
            # The asterisk-form asks about the server, not a resource (RFC 9110 section 9.3.7): this server is the
            # proxy, which answers it as Go's net/http does (200, no body), rather than make it a path upstream.
            scope[_OUTCOME] = "proxy"
            empty = [(b"content-length", b"0"), (b"cache-control", b"no-store")]
            await send({"type": "http.response.start", "status": 200, "headers": empty})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        target = request_target(scope)
        if isinstance(target, Refusal):
            await self._refuse(scope, send, target)
            return
        try:
            scope[UPSTREAM_URL] = self.forward.url(target)
        except (httpx.InvalidURL, UnicodeDecodeError):
            await self._refuse(scope, send, Refusal(400, "invalid-target", "Request target not accepted", _BAD_URL))
            return
        headers = dict(scope["headers"])
        refusal = framing_refusal(headers)
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return
        if scope["method"] not in self.methods or self.key_header not in headers:
            await self.middleware(scope, receive, send)
            return
        # A keyed request: the middleware buffers its body, within a deadline and the process's budget.
        declared = headers.get(b"content-length", b"")
        upfront = int(declared) if declared.isdigit() and int(declared) <= self.config.max_request_bytes else 0
        if upfront and not self.budget.take(upfront):
            await self._refuse(scope, send, OVER_BUDGET)
            return
        body = KeyedBody(receive, self.budget, self.config.body_timeout, upfront)
        responded = False

        async def send_and_note(message: Message) -> None:
            nonlocal responded
            responded = True
            await send(message)

        try:
            await self.middleware(scope, body, send_and_note)
        finally:
            body.close()
        if body.refusal is not None and not responded:
            await self._refuse(scope, send, body.refusal)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        """Answer a request the proxy does not forward, and close the connection (its body may be unread)."""
        scope[_OUTCOME] = "refused"
        problem = Problem(self.config.problem_base_uri + refusal.slug, refusal.title, refusal.status, refusal.detail)
        status, headers, body = problem.render(retry_after=self.config.retry_after if refusal.status == 503 else None)
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _admin(self, scope: Scope, send: Send, path: str) -> None:
        """A request to the admin listener: the proxy's own endpoints, and a 404 for anything else."""
        if path == self.healthz_path or path == self.metrics_path:
            await self._own(scope, send, path)
            return
        body = b'{"detail":"not found: this listener serves only the proxy\'s own endpoints"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _own(self, scope: Scope, send: Send, path: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            body, status, content_type = b'{"detail":"method not allowed"}', 405, b"application/json"
            extra = [(b"allow", b"GET, HEAD")]
        elif path == self.healthz_path:
            body, status, content_type, extra = self._health, 200, b"application/json", []
        else:
            from ..metrics import CONTENT_TYPE

            body, status, content_type, extra = self.observer.exposition(), 200, CONTENT_TYPE.encode("ascii"), []
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
        headers.append((b"cache-control", b"no-store"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    async def _startup(self, send: Send) -> None:
        """Start, once the store has answered (the middleware's ``startup_check``)."""
        check = self.config.policy.startup_check
        if check != "off":
            try:
                await self.middleware.check_store()
            except StoreError as exc:
                what = f"the store {redact(self.config.store)} does not answer ({exc})"
                if check == "fail":
                    hint = "fix --store, or pass --startup-check warn to start anyway"
                    await send({"type": "lifespan.startup.failed", "message": f"idempo proxy: {what}; {hint}"})
                    return
                logging.getLogger("idempo.proxy").warning("idempo proxy: %s; starting anyway", what)
        await send({"type": "lifespan.startup.complete"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._startup(send)
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.aclose()
                except Exception as exc:  # noqa: BLE001 - shutting down: say what failed, and finish
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return


_BAD_URL: Final = "the request target holds characters a URL cannot (a '#', or bytes that are not ASCII)"


def _local_port(scope: Scope) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


def _header_principal(header: str) -> Any:
    name = header.lower().encode("latin-1")

    def principal(scope: Scope) -> bytes:
        for key, value in scope["headers"]:
            if key == name:
                return bytes(value)
        return b""

    return principal


def create_app(
    config: ProxyConfig,
    *,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ProxyApp:
    """The ASGI application ``idempo proxy`` serves, for *config*: run it under any ASGI server.

    Args:
        config: the proxy's settings (:func:`~idempo.proxy.load_config`).
        store: a store object to use instead of opening ``config.store``.
        transport: an httpx transport to reach the upstream through instead of a connection pool (for tests,
            e.g. ``httpx.MockTransport``).

    Raises:
        ConfigurationError: a bad store URL or option.
        MissingDependency: the store's extra, or prometheus_client (the ``cli`` extra), is not installed.
    """
    return ProxyApp(config, store=store, transport=transport)


def app_from_environment() -> ProxyApp:
    """The app factory each worker process calls (``uvicorn --factory``): the configuration the command resolved,
    read from ``IDEMPO_PROXY_RESOLVED_CONFIG``."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        msg = f"{CONFIG_ENV} is not set: start the proxy with 'idempo proxy', or build it with create_app()"
        raise RuntimeError(msg)
    return create_app(ProxyConfig.from_json(text))
