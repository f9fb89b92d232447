"""The httpx transports: keys, retries with the same key, backoff and deadlines, a 503 outcome-unknown returned at
once; and, against the real middleware, a lost response whose retry gets the replay, and an operation of unknown
outcome that is neither retried past its 503 nor run twice."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from idempo import ConfigurationError, IdempotencyMiddleware, MemoryStore, OutcomeUnknownError, mark_outcome_unknown
from idempo.client import DEFAULT_RETRY_STATUSES, AsyncIdempotencyTransport, IdempotencyTransport, is_outcome_unknown
from tests.support.proxy import Upstream, run_proxy

URL = "http://test/charges"
Outcome = httpx.Response | Exception


class Script:
    """A MockTransport handler that answers each attempt with the next scripted outcome and records requests."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.content)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @property
    def keys(self) -> list[str | None]:
        return [request.headers.get("Idempotency-Key") for request in self.requests]


class TopOfRange(random.Random):
    """Jitter that always picks the ceiling, so that backoff waits are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeClock:
    """Monotonic time that moves only when the transport sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def client(script: Script, **options: object) -> tuple[httpx.Client, FakeClock]:
    clock = FakeClock()
    transport = IdempotencyTransport(
        transport=httpx.MockTransport(script),
        sleep=clock.sleep,
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    return httpx.Client(transport=transport), clock


def ok() -> httpx.Response:
    return httpx.Response(201, json={"id": "ch_1"})


# --- keys -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_mutating_request_gets_a_fresh_uuid4_key(method: str) -> None:
    script = Script(ok())
    http, _ = client(script)
    http.request(method, URL)
    http.request(method, URL)
    first, second = script.keys
    assert first is not None
    assert second is not None
    assert uuid.UUID(first).version == 4
    assert first != second


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_other_methods_get_no_key(method: str) -> None:
    script = Script(httpx.Response(200))
    http, _ = client(script)
    http.request(method, URL)
    assert script.keys == [None]


def test_a_key_the_caller_set_is_kept() -> None:
    script = Script(httpx.Response(503), ok())
    http, _ = client(script)
    response = http.post(URL, headers={"Idempotency-Key": "order-42"})
    assert response.status_code == 201
    assert script.keys == ["order-42", "order-42"]


def test_header_and_methods_are_configurable() -> None:
    script = Script(ok())
    http, _ = client(script, header="X-Request-Key", methods={"post"})
    http.post(URL)
    http.put(URL)
    assert "x-request-key" in script.requests[0].headers
    assert "x-request-key" not in script.requests[1].headers
    assert script.keys == [None, None]


# --- what is retried --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(DEFAULT_RETRY_STATUSES))
def test_retried_statuses_are_retried_with_the_same_key(status: int) -> None:
    script = Script(httpx.Response(status), httpx.Response(status), ok())
    http, clock = client(script)
    response = http.post(URL, json={"amount": 100})
    assert response.status_code == 201
    assert len(script.requests) == 3
    assert len(set(script.keys)) == 1
    assert script.keys[0] is not None
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 410, 413, 422, 425, 500, 501, 505])
def test_other_statuses_are_returned_at_once(status: int) -> None:
    script = Script(httpx.Response(status, text="nope"), ok())
    http, clock = client(script)
    response = http.post(URL)
    assert (response.status_code, response.text) == (status, "nope")
    assert len(script.requests) == 1
    assert clock.sleeps == []


def test_retry_statuses_are_configurable() -> None:
    script = Script(httpx.Response(500), ok())
    http, _ = client(script, retry_statuses={500})
    assert http.post(URL).status_code == 201
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        httpx.PoolTimeout("pool full"),
        httpx.ReadTimeout("slow answer"),
        httpx.WriteTimeout("slow upload"),
        httpx.ReadError("reset"),
        httpx.WriteError("broken pipe"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ProxyError("proxy down"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_keyed_request_is_retried_on_transient_transport_errors(error: httpx.TransportError) -> None:
    script = Script(error, ok())
    http, clock = client(script)
    assert http.post(URL).status_code == 201
    assert len(script.requests) == 2
    assert script.keys[0] == script.keys[1] is not None
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize(
    "error",
    [httpx.UnsupportedProtocol("ftp://"), httpx.LocalProtocolError("bad header")],
    ids=lambda error: type(error).__name__,
)
def test_errors_that_would_repeat_are_not_retried(error: httpx.TransportError) -> None:
    script = Script(error, ok())
    http, _ = client(script)
    with pytest.raises(type(error)):
        http.post(URL)
    assert len(script.requests) == 1


def test_application_errors_are_not_retried() -> None:
    script = Script(RuntimeError("handler bug"), ok())
    http, _ = client(script)
    with pytest.raises(RuntimeError, match="handler bug"):
        http.post(URL)
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.PoolTimeout("full")]
)
def test_unkeyed_request_is_retried_when_it_was_never_sent(error: httpx.TransportError) -> None:
    script = Script(error, httpx.Response(200))
    http, _ = client(script)
    assert http.get(URL).status_code == 200
    assert script.keys == [None, None]


@pytest.mark.parametrize(
    "error", [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("disconnected"), httpx.ReadError("reset")]
)
def test_unkeyed_request_is_not_retried_when_it_may_have_been_sent(error: httpx.TransportError) -> None:
    script = Script(error, httpx.Response(200))
    http, _ = client(script)
    with pytest.raises(type(error)):
        http.get(URL)
    assert len(script.requests) == 1


def test_unkeyed_request_is_not_retried_on_responses() -> None:
    script = Script(httpx.Response(503, headers={"Retry-After": "1"}), httpx.Response(200))
    http, _ = client(script)
    assert http.get(URL).status_code == 503
    assert len(script.requests) == 1


# --- outcome unknown ---------------------------------------------------------------------------------------------


def unknown(
    base: str = "urn:idempo:problem:", content_type: str = "application/problem+json", retry_after: str = "2"
) -> httpx.Response:
    """The 503 a server answers a retry with when the first request's outcome is unknown; its ``Retry-After`` (the
    record's remaining life) short enough that a transport which retried it would do so within its deadline."""
    document = {
        "type": f"{base}outcome-unknown",
        "title": "The outcome of the request with this Idempotency-Key is unknown",
        "status": 503,
        "detail": "it may have taken effect, so it is not run again",
    }
    headers = {"Content-Type": content_type, "Retry-After": retry_after}
    return httpx.Response(503, headers=headers, content=json.dumps(document).encode())


@pytest.mark.parametrize(
    ("base", "content_type"),
    [
        ("urn:idempo:problem:", "application/problem+json"),
        ("https://docs.example/problems#", "application/problem+json; charset=utf-8"),
        ("https://docs.example/problems/", "Application/Problem+JSON"),
    ],
)
def test_a_503_outcome_unknown_is_returned_at_once(base: str, content_type: str) -> None:
    script = Script(unknown(base, content_type), ok())
    http, clock = client(script)
    response = http.post(URL, headers={"Idempotency-Key": "order-9"})
    assert response.status_code == 503
    assert response.json()["type"] == f"{base}outcome-unknown"
    assert response.headers["Retry-After"] == "2"
    assert is_outcome_unknown(response)
    assert len(script.requests) == 1
    assert clock.sleeps == []


def test_a_504_is_retried_with_the_same_key_and_the_503_outcome_unknown_that_follows_is_not() -> None:
    script = Script(httpx.Response(504, text="upstream timed out"), unknown(), ok())
    http, clock = client(script)
    response = http.post(URL, json={"amount": 100})
    assert is_outcome_unknown(response)
    assert len(script.requests) == 2
    assert script.keys[0] == script.keys[1] is not None
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(503, headers={"Content-Type": "application/problem+json"}, json={"type": "urn:x:store-down"}),
        httpx.Response(503, headers={"Content-Type": "application/json"}, json={"type": "urn:x:outcome-unknown"}),
        httpx.Response(503, headers={"Content-Type": "application/problem+json"}, content=b"{not json"),
        httpx.Response(503, headers={"Content-Type": "application/problem+json"}, content=b"\xff\xfe"),
        httpx.Response(503, headers={"Content-Type": "application/problem+json"}, json=["outcome-unknown"]),
        httpx.Response(503, headers={"Content-Type": "application/problem+json"}, json={"type": 7}),
        httpx.Response(503, text="Service Unavailable"),
    ],
    ids=["other-problem", "not-problem-json", "not-json", "not-utf8", "not-an-object", "type-not-a-string", "text"],
)
def test_any_other_503_is_still_retried(response: httpx.Response) -> None:
    script = Script(response, ok())
    http, _ = client(script)
    assert http.post(URL).status_code == 201
    assert len(script.requests) == 2
    assert script.keys[0] == script.keys[1]


def test_an_outcome_unknown_type_on_another_status_is_not_special() -> None:
    conflict = httpx.Response(
        409, headers={"Content-Type": "application/problem+json"}, json={"type": "x:outcome-unknown"}
    )
    script = Script(conflict, ok())
    http, _ = client(script)
    assert http.post(URL).status_code == 201
    assert len(script.requests) == 2


def test_a_compressed_outcome_unknown_problem_is_recognised_and_handed_on_decoded() -> None:
    body = unknown().content
    compressed = httpx.Response(
        503,
        headers={"Content-Type": "application/problem+json", "Content-Encoding": "gzip", "Retry-After": "2"},
        content=gzip.compress(body),
    )
    script = Script(compressed, ok())
    http, _ = client(script)
    response = http.post(URL)
    assert len(script.requests) == 1
    assert response.content == body
    assert "content-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(body))
    assert response.headers["retry-after"] == "2"


def test_a_503_left_out_of_retry_statuses_is_not_read_by_the_transport() -> None:
    stream = TrackedStream(unknown().content)
    script = Script(httpx.Response(503, headers={"Content-Type": "application/problem+json"}, stream=stream), ok())
    http, _ = client(script, retry_statuses={429})
    with http.stream("POST", URL) as response:
        assert response.status_code == 503
        assert not stream.read  # the caller's to read
        response.read()
    assert is_outcome_unknown(response)


def test_a_broken_503_body_is_a_transport_error_and_retried() -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b'{"type":'
            raise httpx.ReadError("connection reset")

    script = Script(httpx.Response(503, headers={"Content-Type": "application/problem+json"}, stream=Broken()), ok())
    http, clock = client(script)
    assert http.post(URL).status_code == 201
    assert len(script.requests) == 2
    assert len(clock.sleeps) == 1


def test_is_outcome_unknown_is_false_for_other_answers() -> None:
    assert not is_outcome_unknown(ok())
    assert not is_outcome_unknown(httpx.Response(503, text="busy"))
    assert not is_outcome_unknown(unknown(content_type="application/json"))


async def test_async_returns_a_503_outcome_unknown_at_once_after_retrying_a_502() -> None:
    script = Script(httpx.Response(502), unknown(), ok())
    sleeps: list[float] = []
    async with async_client(script, sleeps) as http:
        response = await http.post(URL, json={"amount": 5})
    assert is_outcome_unknown(response)
    assert response.headers["Retry-After"] == "2"
    assert len(script.requests) == 2
    assert len(set(script.keys)) == 1
    assert len(sleeps) == 1


# --- how long, how often ----------------------------------------------------------------------------------------


def test_attempts_bound_the_retries_and_the_last_response_is_returned() -> None:
    script = Script(httpx.Response(503, text="still down"))
    http, clock = client(script, attempts=3)
    response = http.post(URL)
    assert (response.status_code, response.text) == (503, "still down")
    assert len(script.requests) == 3
    assert len(clock.sleeps) == 2


def test_the_last_error_is_raised_when_attempts_run_out() -> None:
    script = Script(httpx.ConnectError("refused"))
    http, _ = client(script)
    with pytest.raises(httpx.ConnectError, match="refused"):
        http.post(URL)
    assert len(script.requests) == 5
    assert len(set(script.keys)) == 1


def test_one_attempt_means_no_retry() -> None:
    script = Script(httpx.Response(503), ok())
    http, _ = client(script, attempts=1)
    assert http.post(URL).status_code == 503


def test_backoff_doubles_from_its_base_up_to_its_cap() -> None:
    script = Script(httpx.Response(502))
    http, clock = client(script, attempts=6, backoff_base=1.0, backoff_cap=5.0, max_elapsed=100, rng=TopOfRange())
    http.post(URL)
    assert clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_has_full_jitter() -> None:
    script = Script(httpx.Response(502))
    http, clock = client(script, attempts=40, backoff_base=1.0, backoff_cap=4.0, max_elapsed=1e9, rng=random.Random(7))
    http.post(URL)
    ceilings = [min(4.0, 2.0**n) for n in range(39)]
    assert all(0 <= wait <= ceiling for wait, ceiling in zip(clock.sleeps, ceilings, strict=True))
    assert min(clock.sleeps[2:]) < 1.0 < max(clock.sleeps[2:])  # spread over the whole range, not a fixed wait


def test_retry_after_seconds_are_waited_exactly() -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "7"}), ok())
    http, clock = client(script)
    assert http.post(URL).status_code == 201
    assert clock.sleeps == [7.0]


def test_retry_after_date_is_measured_from_the_responses_date() -> None:
    sent = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers = {
        "Date": email.utils.format_datetime(sent, usegmt=True),
        "Retry-After": email.utils.format_datetime(sent + timedelta(seconds=12), usegmt=True),
    }
    script = Script(httpx.Response(503, headers=headers), ok())
    http, clock = client(script)
    assert http.post(URL).status_code == 201
    assert clock.sleeps == [12.0]


def test_retry_after_date_without_a_date_header_uses_the_local_clock() -> None:
    later = datetime.now(UTC) + timedelta(seconds=10)
    script = Script(httpx.Response(503, headers={"Retry-After": email.utils.format_datetime(later, usegmt=True)}), ok())
    http, clock = client(script)
    assert http.post(URL).status_code == 201
    [wait] = clock.sleeps
    assert 8.0 < wait <= 10.0


def test_retry_after_date_in_the_past_means_now() -> None:
    script = Script(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), ok())
    http, clock = client(script)
    assert http.post(URL).status_code == 201
    assert clock.sleeps == [0.0]


@pytest.mark.parametrize("value", ["soon", "-3", "1.5", "", "3 s", "1e3"])
def test_unreadable_retry_after_falls_back_to_backoff(value: str) -> None:
    script = Script(httpx.Response(503, headers={"Retry-After": value}), ok())
    http, clock = client(script, backoff_base=0.25, rng=TopOfRange())
    assert http.post(URL).status_code == 201
    assert clock.sleeps == [0.25]


def test_retry_after_beyond_the_deadline_gives_up_without_sleeping() -> None:
    script = Script(httpx.Response(503, headers={"Retry-After": "120"}, text="down"), ok())
    http, clock = client(script, max_elapsed=30)
    response = http.post(URL)
    assert (response.status_code, response.text) == (503, "down")
    assert len(script.requests) == 1
    assert clock.sleeps == []


def test_max_elapsed_bounds_the_total_wait() -> None:
    script = Script(httpx.Response(504))
    http, clock = client(script, attempts=100, backoff_base=1.0, backoff_cap=4.0, max_elapsed=10, rng=TopOfRange())
    assert http.post(URL).status_code == 504
    assert clock.sleeps == [1.0, 2.0, 4.0]  # 7 s waited; the next 4 s would end at 11 s, past the deadline
    assert len(script.requests) == 4


def test_zero_max_elapsed_allows_only_immediate_retries() -> None:
    script = Script(httpx.Response(503, headers={"Retry-After": "0"}), ok())
    http, clock = client(script, max_elapsed=0)
    assert http.post(URL).status_code == 201
    assert clock.sleeps == [0.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": 0}, "attempts must be at least 1, not 0"),
        ({"backoff_base": -1.0}, "backoff_base, backoff_cap and max_elapsed must not be negative"),
        ({"backoff_cap": -1.0}, "backoff_base, backoff_cap and max_elapsed must not be negative"),
        ({"max_elapsed": -1.0}, "backoff_base, backoff_cap and max_elapsed must not be negative"),
        ({"header": " "}, "header must name a header"),
    ],
)
@pytest.mark.parametrize("transport", [IdempotencyTransport, AsyncIdempotencyTransport])
def test_options_out_of_range_are_a_configuration_error(
    transport: type[IdempotencyTransport | AsyncIdempotencyTransport], options: dict[str, object], message: str
) -> None:
    """idempo's own ConfigurationError, which is still a ValueError for callers that catch that."""
    with pytest.raises(ConfigurationError) as raised:
        transport(transport=httpx.MockTransport(Script(ok())), **options)  # type: ignore[arg-type]
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


# --- bodies and connections -------------------------------------------------------------------------------------


def test_a_streaming_body_is_sent_whole_on_every_attempt() -> None:
    script = Script(httpx.ReadTimeout("lost"), httpx.Response(503), ok())
    http, _ = client(script)

    def chunks() -> Iterator[bytes]:
        yield b'{"amount":'
        yield b"100}"

    assert http.post(URL, content=chunks()).status_code == 201
    assert script.bodies == [b'{"amount":100}'] * 3


class TrackedStream(httpx.SyncByteStream):
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.read = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield self.body

    def close(self) -> None:
        self.closed = True


def test_a_response_that_is_retried_is_read_and_closed() -> None:
    stream = TrackedStream(b'{"status":409}')
    script = Script(httpx.Response(409, stream=stream), ok())
    http, _ = client(script)
    assert http.post(URL).status_code == 201
    assert (stream.read, stream.closed) == (True, True)


def test_closing_the_transport_closes_the_wrapped_one() -> None:
    closed: list[bool] = []

    class Inner(httpx.MockTransport):
        def close(self) -> None:
            closed.append(True)

    with httpx.Client(transport=IdempotencyTransport(transport=Inner(Script(ok())))):
        pass
    assert closed == [True]


async def test_default_inner_transports_are_httpx_own() -> None:
    with IdempotencyTransport() as sync:
        assert isinstance(sync._transport, httpx.HTTPTransport)
    async with AsyncIdempotencyTransport() as transport:
        assert isinstance(transport._transport, httpx.AsyncHTTPTransport)


def test_a_missing_httpx_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n    import idempo.client\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout == "MissingDependency 'httpx' is not installed; run: pip install 'idempo[client]'\n"


# --- async ------------------------------------------------------------------------------------------------------


def async_client(script: Script, sleeps: list[float], **options: object) -> httpx.AsyncClient:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=httpx.MockTransport(script), sleep=sleep, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport)


async def test_async_retries_with_the_same_key_and_honours_retry_after() -> None:
    script = Script(
        httpx.ConnectError("refused"), httpx.Response(409, headers={"Retry-After": "2"}), httpx.Response(429), ok()
    )
    sleeps: list[float] = []
    async with async_client(script, sleeps, rng=TopOfRange()) as http:
        response = await http.post(URL, json={"amount": 100})
    assert response.status_code == 201
    assert len(script.requests) == 4
    assert len(set(script.keys)) == 1
    assert sleeps == [0.5, 2.0, 2.0]  # backoff 0.5 * 2**0, Retry-After 2, backoff 0.5 * 2**2
    assert script.bodies == [b'{"amount":100}'] * 4


async def test_async_does_not_retry_client_errors_nor_key_unkeyed_requests() -> None:
    script = Script(httpx.Response(422), ok())
    sleeps: list[float] = []
    async with async_client(script, sleeps) as http:
        assert (await http.patch(URL, headers={"Idempotency-Key": "k1"})).status_code == 422
        script.outcomes = [httpx.ReadTimeout("slow"), ok()]
        with pytest.raises(httpx.ReadTimeout):
            await http.get(URL)
    assert script.keys == ["k1", None]
    assert sleeps == []


async def test_async_gives_up_at_the_deadline_and_closes_what_it_retried() -> None:
    closed: list[int] = []

    class Closing(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"busy"

        async def aclose(self) -> None:
            closed.append(1)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "3"}, stream=Closing())

    sleeps: list[float] = []
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    transport = AsyncIdempotencyTransport(
        transport=httpx.MockTransport(handler), sleep=sleep, clock=clock, max_elapsed=7
    )
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.post(URL)
    assert response.status_code == 503
    assert sleeps == [3.0, 3.0]
    assert len(closed) == 3  # two retried and closed by the transport, the last one by the client after reading


# --- against the real middleware --------------------------------------------------------------------------------


def charges_app() -> tuple[ASGIApp, list[str]]:
    """A payments endpoint behind the middleware, and the keys its handler actually ran with."""
    runs: list[str] = []

    async def charge(request: Request) -> JSONResponse:
        body = await request.json()
        runs.append(request.state.idempotency_key)
        return JSONResponse({"id": f"ch_{len(runs)}", "amount": body["amount"]}, status_code=201)

    app = Starlette(routes=[Route("/charges", charge, methods=["POST"])])
    return IdempotencyMiddleware(app, store=MemoryStore()), runs


class LoseFirstResponse(httpx.AsyncBaseTransport):
    """Lets the first request reach the server and run, then loses its response: a timeout after the fact."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.lost: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.lost:
            return response
        await response.aread()
        await response.aclose()
        self.lost.append(response)
        raise httpx.ReadTimeout("the response was lost on the way back", request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_lost_response_is_replayed_and_the_charge_runs_once() -> None:
    app, runs = charges_app()
    faulty = LoseFirstResponse(httpx.ASGITransport(app=app))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=faulty, sleep=sleep)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/charges", json={"amount": 100})

    [lost] = faulty.lost
    assert (lost.status_code, lost.json()) == (201, {"id": "ch_1", "amount": 100})
    assert (response.status_code, response.content) == (lost.status_code, lost.content)
    assert response.headers["idempotent-replayed"] == "true"
    assert len(runs) == 1
    assert runs[0] == response.request.headers["Idempotency-Key"]
    assert len(sleeps) == 1


async def test_a_retry_that_meets_the_first_still_running_waits_and_gets_its_replay() -> None:
    entered, finish = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def charge(request: Request) -> JSONResponse:
        runs.append(request.state.idempotency_key)
        entered.set()
        await finish.wait()
        return JSONResponse({"id": "ch_1"}, status_code=201)

    app = IdempotencyMiddleware(Starlette(routes=[Route("/charges", charge, methods=["POST"])]), store=MemoryStore())
    sleeps: list[float] = []
    first_done: list[asyncio.Task[httpx.Response]] = []

    async def sleep(seconds: float) -> None:
        # The 409's Retry-After: let the first request finish, then retry.
        sleeps.append(seconds)
        finish.set()
        await first_done[0]

    transport = AsyncIdempotencyTransport(transport=httpx.ASGITransport(app=app), sleep=sleep)
    headers = {"Idempotency-Key": "order-7"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        first_done.append(asyncio.create_task(http.post("/charges", json={}, headers=headers)))
        await entered.wait()
        second = await http.post("/charges", json={}, headers=headers)
        first = await first_done[0]

    assert sleeps == [1.0]  # the middleware's Retry-After on its 409
    assert (second.status_code, second.content) == (first.status_code, first.content) == (201, b'{"id":"ch_1"}')
    assert second.headers["idempotent-replayed"] == "true"
    assert runs == ["order-7"]


class LoseFirstResponseSync(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.lost: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.lost:
            return response
        response.read()
        response.close()
        self.lost.append(response)
        raise httpx.ReadTimeout("the response was lost on the way back", request=request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def served_charges() -> Iterator[tuple[str, list[str]]]:
    """The charges app under uvicorn in a thread, on a socket bound before the server starts (so connections
    wait in its backlog rather than the test waiting for the server)."""
    app, runs = charges_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", runs
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def test_sync_transport_over_a_real_server_replays_a_lost_response(
    served_charges: tuple[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="idempo.client")
    base_url, runs = served_charges
    faulty = LoseFirstResponseSync(httpx.HTTPTransport())
    sleeps: list[float] = []
    transport = IdempotencyTransport(transport=faulty, sleep=sleeps.append)
    with httpx.Client(transport=transport, base_url=base_url, timeout=10) as http:
        response = http.post("/charges", json={"amount": 250})

    [lost] = faulty.lost
    assert (lost.status_code, lost.json()) == (201, {"id": "ch_1", "amount": 250})
    assert (response.status_code, response.content) == (lost.status_code, lost.content)
    assert response.headers["idempotent-replayed"] == "true"
    assert runs == [response.request.headers["Idempotency-Key"]]
    assert len(sleeps) == 1
    [retry] = client_logs(caplog)  # the sync transport logs as the async one does
    assert (retry.level, retry.key, retry.attempt, retry.wait) == (logging.INFO, runs[0], 2, sleeps[0])
    assert retry.reason == "ReadTimeout: the response was lost on the way back"
    assert retry.message.startswith(f"idempo: POST {base_url}/charges (Idempotency-Key {runs[0]!r}): ")


async def test_async_transport_over_a_real_server_replays_a_lost_response(
    served_charges: tuple[str, list[str]],
) -> None:
    """The same over real TCP, with the async transport: the server ran the charge, its response was lost, the
    retry (same key) gets the stored response, and the charge ran once."""
    base_url, runs = served_charges
    faulty = LoseFirstResponse(httpx.AsyncHTTPTransport())
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=faulty, sleep=sleep)
    async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=10) as http:
        response = await http.post("/charges", json={"amount": 300})

    [lost] = faulty.lost
    assert (lost.status_code, lost.json()) == (201, {"id": "ch_1", "amount": 300})
    assert (response.status_code, response.content) == (lost.status_code, lost.content)
    assert response.headers["idempotent-replayed"] == "true"
    assert runs == [response.request.headers["Idempotency-Key"]]
    assert len(sleeps) == 1


# --- against the real middleware: an outcome that is unknown ------------------------------------------------------


def uncertain_app(first_answer: str) -> tuple[ASGIApp, list[str]]:
    """A payments endpoint behind the middleware whose call to its provider times out after it was sent: the charge
    may have been made. *first_answer* is how the handler says so: ``"raise"`` (``OutcomeUnknownError``: the
    middleware answers the 503 itself), or ``"504"`` (``mark_outcome_unknown()`` and a 504, as a gateway answers)."""
    runs: list[str] = []

    async def charge(request: Request) -> JSONResponse:
        runs.append(request.state.idempotency_key)
        if first_answer == "raise":
            raise OutcomeUnknownError("the payment provider did not answer in time")
        mark_outcome_unknown()
        return JSONResponse({"detail": "the payment provider did not answer in time"}, status_code=504)

    middleware = [Middleware(IdempotencyMiddleware, store=MemoryStore(), unknown_outcome_ttl=5)]  # a short Retry-After
    return Starlette(routes=[Route("/charges", charge, methods=["POST"])], middleware=middleware), runs


async def test_middleware_outcome_unknown_error_is_returned_at_once_and_never_runs_again() -> None:
    app, runs = uncertain_app("raise")
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=httpx.ASGITransport(app=app), sleep=sleep)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        first = await http.post("/charges", json={"amount": 100})
        key = first.request.headers["Idempotency-Key"]
        again = await http.post("/charges", json={"amount": 100}, headers={"Idempotency-Key": key})

    for response in (first, again):
        assert is_outcome_unknown(response), response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert 1 <= int(response.headers["Retry-After"]) <= 5
    assert runs == [key]  # the first request ran; its retry did not
    assert sleeps == []  # nothing was retried by the transport


async def test_middleware_a_gateways_504_is_retried_with_the_same_key_then_the_503_stops_the_retries() -> None:
    app, runs = uncertain_app("504")
    sent: list[str] = []

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request.headers["Idempotency-Key"])
            return await inner.handle_async_request(request)

    inner = httpx.ASGITransport(app=app)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=Recording(), sleep=sleep, attempts=5)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/charges", json={"amount": 100})

    assert is_outcome_unknown(response), response.text
    assert len(sent) == 2  # the 504, then its retry's 503, and no third attempt
    assert sent[0] == sent[1] == response.request.headers["Idempotency-Key"]
    assert runs == [sent[0]]
    assert len(sleeps) == 1


@pytest.fixture
def served_uncertain() -> Iterator[tuple[str, list[str]]]:
    """The 504-answering app under uvicorn in a thread, as ``served_charges``."""
    app, runs = uncertain_app("504")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", runs
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def test_sync_transport_over_a_real_server_stops_at_the_503_outcome_unknown(
    served_uncertain: tuple[str, list[str]],
) -> None:
    base_url, runs = served_uncertain
    sleeps: list[float] = []
    transport = IdempotencyTransport(sleep=sleeps.append)
    with httpx.Client(transport=transport, base_url=base_url, timeout=10) as http:
        response = http.post("/charges", json={"amount": 250})
        assert response.elapsed.total_seconds() >= 0  # handed on unread, the client read and timed it as usual
        again = http.post("/charges", json={"amount": 250}, headers={"Idempotency-Key": runs[0]})

    assert is_outcome_unknown(response), response.text
    assert is_outcome_unknown(again), again.text
    assert runs == [response.request.headers["Idempotency-Key"]]  # once, for two calls and three attempts
    assert len(sleeps) == 1  # after the 504 only


# --- logging: every retry, and giving up ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """One record of the ``idempo.client`` logger, with the fields the transports put on it."""

    level: int
    message: str
    key: str | None
    attempt: int
    attempts: int
    reason: str
    wait: float | None
    record: logging.LogRecord

    def exposes(self, secret: str) -> bool:
        """Whether *secret* is anywhere in the record: its message or any of its attributes."""
        return secret in self.message or any(secret in str(value) for value in vars(self.record).values())


def client_logs(caplog: pytest.LogCaptureFixture) -> list[Logged]:
    """The records of the ``idempo.client`` logger; their fields, set through ``extra=``, are in their ``vars``."""
    return [
        Logged(
            level=record.levelno,
            message=record.getMessage(),
            key=vars(record)["idempotency_key"],
            attempt=vars(record)["attempt"],
            attempts=vars(record)["attempts"],
            reason=vars(record)["reason"],
            wait=vars(record)["wait"],
            record=record,
        )
        for record in caplog.records
        if record.name == "idempo.client"
    ]


async def test_each_retry_is_logged_with_its_key_attempt_reason_and_wait_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lost response, retried against the real middleware: one INFO record, with the key, the attempt about to be
    made, the error and the wait; neither the body, nor the Authorization header, nor the query string."""
    caplog.set_level(logging.INFO, logger="idempo.client")
    app, runs = charges_app()
    faulty = LoseFirstResponse(httpx.ASGITransport(app=app))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=faulty, sleep=sleep)
    headers = {"Authorization": "Bearer tok-alice-secret", "Idempotency-Key": "order-77"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/charges?session=q-secret", json={"amount": 4242}, headers=headers)
        assert response.headers["idempotent-replayed"] == "true"
        assert len(client_logs(caplog)) == 1
        fresh = await http.post("/charges", json={"amount": 1}, headers={"Authorization": "Bearer tok-alice-secret"})
    assert fresh.status_code == 201  # answered at once: nothing to log

    [retry] = client_logs(caplog)
    assert retry.level == logging.INFO
    assert retry.message == (
        "idempo: POST http://test/charges (Idempotency-Key 'order-77'): ReadTimeout: the response was lost on the way "
        f"back; retrying in {sleeps[0]:.2f} s, attempt 2 of 5"
    )
    assert (retry.key, retry.attempt, retry.attempts, retry.wait) == ("order-77", 2, 5, sleeps[0])
    assert retry.reason == "ReadTimeout: the response was lost on the way back"
    assert runs == ["order-77", fresh.request.headers["Idempotency-Key"]]
    for secret in ("tok-alice-secret", "q-secret", "4242"):
        assert not retry.exposes(secret), secret


async def test_retries_on_responses_log_their_status_and_giving_up_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real endpoint behind the middleware that is busy (503, Retry-After: 1) every time: an INFO record per
    retry with the status and the Retry-After it waits, then a WARNING when no attempt is left."""
    caplog.set_level(logging.INFO, logger="idempo.client")
    calls: list[str] = []

    async def busy(request: Request) -> JSONResponse:
        calls.append(request.state.idempotency_key)
        return JSONResponse({"detail": "busy"}, status_code=503, headers={"Retry-After": "1"})

    app = IdempotencyMiddleware(Starlette(routes=[Route("/charges", busy, methods=["POST"])]), store=MemoryStore())
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=httpx.ASGITransport(app=app), sleep=sleep, attempts=3)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/charges", json={})

    assert response.status_code == 503
    key = response.request.headers["Idempotency-Key"]
    assert calls == [key] * 3  # the middleware stores no 5xx: every attempt ran
    records = client_logs(caplog)
    assert [(r.level, r.attempt, r.wait, r.reason) for r in records] == [
        (logging.INFO, 2, 1.0, "503 Service Unavailable"),
        (logging.INFO, 3, 1.0, "503 Service Unavailable"),
        (logging.WARNING, 3, None, "503 Service Unavailable"),
    ]
    assert {r.key for r in records} == {key}
    assert records[1].message.endswith("503 Service Unavailable; retrying in 1.00 s, attempt 3 of 3")
    assert records[2].message == (
        f"idempo: POST http://test/charges (Idempotency-Key {key!r}): 503 Service Unavailable; giving up after 3 "
        "attempts"
    )


async def test_giving_up_at_the_deadline_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="idempo.client")

    async def busy(request: Request) -> JSONResponse:
        return JSONResponse({"detail": "slow down"}, status_code=429, headers={"Retry-After": "2"})

    app = IdempotencyMiddleware(Starlette(routes=[Route("/charges", busy, methods=["POST"])]), store=MemoryStore())
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        clock.now += seconds

    transport = AsyncIdempotencyTransport(
        transport=httpx.ASGITransport(app=app), sleep=sleep, clock=clock, max_elapsed=3
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.post("/charges", json={})).status_code == 429

    retry, gave_up = client_logs(caplog)
    assert (retry.level, retry.attempt, retry.wait) == (logging.INFO, 2, 2.0)
    assert (gave_up.level, gave_up.attempt, gave_up.wait) == (logging.WARNING, 2, None)
    assert gave_up.message.endswith(
        "429 Too Many Requests; giving up after 2 attempts: waiting 2.00 s more would pass max_elapsed (3 s)"
    )


async def test_a_503_outcome_unknown_is_logged_as_a_warning_after_the_504_it_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="idempo.client")
    app, runs = uncertain_app("504")
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotencyTransport(transport=httpx.ASGITransport(app=app), sleep=sleep)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/charges", json={"amount": 100})

    assert is_outcome_unknown(response)
    retry, stopped = client_logs(caplog)
    assert (retry.level, retry.reason, retry.wait) == (logging.INFO, "504 Gateway Timeout", sleeps[0])
    assert (stopped.level, stopped.reason, stopped.attempt) == (logging.WARNING, "503 Service Unavailable", 2)
    assert stopped.message.endswith(
        "503 Service Unavailable; the server cannot tell whether the operation ran (outcome-unknown): not retried"
    )
    assert runs == [retry.key]


def test_errors_are_logged_by_class_and_message_and_unkeyed_requests_say_they_have_no_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="idempo.client")
    script = Script(httpx.ConnectError("[Errno 111] Connection refused"))
    http, clock = client(script, attempts=2, rng=TopOfRange())
    with pytest.raises(httpx.ConnectError):
        http.get("http://user:pw-secret@test/charges?q=1")

    retry, gave_up = client_logs(caplog)
    assert retry.message == (
        "idempo: GET http://test/charges (no Idempotency-Key): ConnectError: [Errno 111] Connection refused; "
        "retrying in 0.50 s, attempt 2 of 2"
    )
    assert retry.key is None
    assert gave_up.level == logging.WARNING
    assert gave_up.message.endswith("Connection refused; giving up after 2 attempts")
    assert not retry.exposes("pw-secret")
    assert clock.sleeps == [0.5]


def test_errors_no_retry_would_mend_and_final_answers_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="idempo.client")
    script = Script(httpx.Response(422), httpx.UnsupportedProtocol("gopher"), httpx.ReadTimeout("slow"))
    http, _ = client(script)
    assert http.post(URL).status_code == 422
    with pytest.raises(httpx.UnsupportedProtocol):
        http.post(URL)
    with pytest.raises(httpx.ReadTimeout):
        http.get(URL)  # unkeyed, and it may have been sent
    assert client_logs(caplog) == []


# --- against a real idempo proxy: its upstream times out -----------------------------------------------------------


def test_through_idempo_proxy_an_upstream_timeout_is_retried_once_and_the_charge_runs_once(tmp_path: Path) -> None:
    """``idempo proxy`` and its upstream as processes of their own, over TCP. The upstream holds the charge past the
    proxy's ``--upstream-timeout``: the proxy answers 504 and keeps the key (the charge may have been made); the
    transport retries the 504 with the same key, gets the 503 outcome-unknown, and stops there."""
    upstream = Upstream(tmp_path / "upstream")
    upstream.directory.mkdir()
    upstream.start()
    try:
        args = ["--upstream", upstream.url, "--store", f"sqlite:///{tmp_path / 'proxy.db'}"]
        args += ["--upstream-timeout", "0.5"]
        args += ["--unknown-outcome-ttl", "20"]  # a Retry-After within the transport's 30 s: it would retry it
        with run_proxy(tmp_path / "proxy", args) as proxy:
            sent: list[str] = []

            class Recording(httpx.BaseTransport):
                def __init__(self) -> None:
                    self.inner = httpx.HTTPTransport()

                def handle_request(self, request: httpx.Request) -> httpx.Response:
                    sent.append(request.headers["Idempotency-Key"])
                    return self.inner.handle_request(request)

                def close(self) -> None:
                    self.inner.close()

            sleeps: list[float] = []
            transport = IdempotencyTransport(transport=Recording(), sleep=sleeps.append, attempts=5)
            with httpx.Client(transport=transport, base_url=proxy.url, timeout=30) as http:
                response = http.post("/op/charge?hold=1", json={"amount": 100})
                attempts = len(sent)
                upstream.release("charge")  # the upstream finishes the first attempt, as a slow one would
                again = http.post("/op/charge?hold=1", json={"amount": 100}, headers={"Idempotency-Key": sent[0]})
    finally:
        upstream.release("charge")
        upstream.stop()

    assert is_outcome_unknown(response), response.text
    assert 1 <= int(response.headers["Retry-After"]) <= 20
    assert attempts == 2  # the 504, then the 503 outcome-unknown: no third attempt
    assert sent == [sent[0]] * 3  # and the later call, with the same key
    assert len(sleeps) == 1
    assert is_outcome_unknown(again), again.text  # still kept, even after the upstream finished
    assert upstream.count("charge") == 1
