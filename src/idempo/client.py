"""httpx transports that give each mutating request an ``Idempotency-Key`` and retry it safely with the same key.

Wrap the default transport, or any other, and use it as a client's ``transport``::

    import httpx
    from idempo.client import AsyncIdempotencyTransport, IdempotencyTransport

    client = httpx.Client(transport=IdempotencyTransport())
    aclient = httpx.AsyncClient(transport=AsyncIdempotencyTransport(transport=httpx.AsyncHTTPTransport(retries=2)))

What the transports do with each request (``docs/client.md`` has the reasoning):

- A POST, PUT, PATCH or DELETE (``methods=``) without the key header (``header=``) gets a fresh UUIDv4 key; a
  key the caller set is kept as it is. The key is chosen once, so every retry carries the same one.
- A *keyed* request (one whose method is in ``methods``) is retried on transport errors that may be transient
  (timeouts, network errors, a broken response, a proxy error): whether or not the server ran it, the key makes
  the retry safe. Not on ``UnsupportedProtocol`` or ``LocalProtocolError``, which would fail again.
- Any other request (GET, HEAD, ...) is retried only on errors that prove it was never sent: ``ConnectError``,
  ``ConnectTimeout`` and ``PoolTimeout``. No key protects it, and whether a method is safe to repeat is the
  server's to say, so the transport does not guess.
- A keyed request is retried on the responses 409 (the first request is still running), 429, 502, 503 and 504
  (``retry_statuses=``). Never on 400 or 422 (the request is wrong; it would fail the same way), nor on any
  other 4xx, nor by default on 500: a 500 is usually a bug that answers every retry the same way. (It would be
  *safe*, since idempo's middleware stores no 5xx and releases the key; add 500 to ``retry_statuses`` if yours
  are transient.)
- Except a 503 *outcome-unknown* problem (``application/problem+json`` whose ``type`` ends with
  ``outcome-unknown``): the server cannot tell whether the operation happened, and keeps the key in that state
  until the record expires or an operator resolves it, so a retry gets the same answer; it is returned at once
  (:func:`is_outcome_unknown` tells it apart). To look, the transport reads the body of a keyed request's 503
  problem document (and hands the response on with that body already decoded). The key never changes: a 504 or
  502 from a gateway is retried with it, and the retry gets that 503 if the gateway's attempt may have run.
- Waits follow exponential backoff with full jitter, ``uniform(0, min(backoff_cap, backoff_base * 2**retry))``
  with ``retry`` counted from 0, unless the response carries ``Retry-After`` (delta-seconds or an HTTP-date),
  which is then waited exactly. At most ``attempts`` attempts are made, and the transport never sleeps past
  ``max_elapsed`` seconds after the request began: a wait that would end later gives up instead, returning the
  last response or raising the last error. (Each attempt is bounded by the client's own httpx timeouts.)
- The request body is read into memory before the first attempt, so every retry sends the same bytes; a
  streaming body is buffered whole.
- A response that is going to be retried is read and closed first, so its connection goes back to the pool.
- Each retry is logged at INFO on the ``idempo.client`` logger: the method and URL (without its query string),
  the key, the attempt about to be made, the reason (the status, or the error's class and message) and the wait
  before it. Giving up on a retryable answer (no attempt left, or a wait that would pass ``max_elapsed``) and a
  503 *outcome-unknown* are logged at WARNING: the caller is about to get a failure the retries could not mend.
  Neither the body nor any header but the key is logged. The values are on each log record too, as
  ``idempotency_key``, ``attempt``, ``attempts``, ``reason`` and ``wait`` (``None`` when giving up), for
  structured logging.

Why a loop here rather than a retry library: the issue asked to prefer a well-kept one if it fits the transport
cleanly. *stamina* retries on exceptions only: retrying on a response would mean raising an exception for it
and unwrapping the last response on give-up, its backoff is ``wait_initial * base**n + uniform(0, jitter)``
rather than full jitter, and "give up when ``Retry-After`` outruns the deadline" has no place in it. *tenacity*
can do it (``retry_if_result``, a custom ``wait`` reading ``Retry-After``, ``retry_error_callback`` to return
the last response, ``before_sleep`` to close it, ``sleep=`` for tests), but only by replacing four of its five
parts with our own functions, for sync and async, at the cost of a dependency for ``idempo[client]``. What is
left is a dozen-line loop around one pure object, :class:`_Retries`, which decides (and is tested) without I/O,
so both transports share every rule. This module needs httpx and nothing else.

For tests, pass ``sleep=`` (and ``clock=``) to make waiting instant and time controllable, and ``rng=`` for
predictable jitter.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from ._core.errors import ConfigurationError
from ._core.extras import require

if TYPE_CHECKING:
    import httpx
else:
    httpx = require("httpx", extra="client")

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "AsyncIdempotencyTransport",
    "IdempotencyTransport",
    "is_outcome_unknown",
]

logger = logging.getLogger("idempo.client")

DEFAULT_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""The methods that get a key, and the only ones retried on responses or after they may have been sent."""
DEFAULT_RETRY_STATUSES: Final = frozenset({409, 429, 502, 503, 504})
"""The response statuses a keyed request is retried on."""

# Errors after which the request may or may not have reached the server: retried only when a key protects it.
_MAYBE_SENT: Final = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)
# Errors that prove the request never left the client: any request may be retried after them.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class _Options:
    """Strictly private. One transport's configuration, shared by its requests."""

    header: str
    methods: frozenset[str]
    retry_statuses: frozenset[int]
    attempts: int
    backoff_base: float
    backoff_cap: float
    max_elapsed: float
    rng: random.Random

    @classmethod
    def make(
        cls,
        *,
        header: str,
        methods: Collection[str],
        retry_statuses: Collection[int],
        attempts: int,
        backoff_base: float,
        backoff_cap: float,
        max_elapsed: float,
        rng: random.Random | None,
    ) -> _Options:
        if attempts < 1:
            msg = f"attempts must be at least 1, not {attempts}"
            raise ConfigurationError(msg)
        if backoff_base < 0 or backoff_cap < 0 or max_elapsed < 0:
            msg = "backoff_base, backoff_cap and max_elapsed must not be negative"
            raise ConfigurationError(msg)
        if not header.strip():
            msg = "header must name a header"
            raise ConfigurationError(msg)
        return cls(
            header=header,
            methods=frozenset(m.upper() for m in methods),
            retry_statuses=frozenset(retry_statuses),
            attempts=attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_elapsed=max_elapsed,
            rng=rng if rng is not None else random.Random(),
        )

    def prepare(self, request: httpx.Request) -> bool:
        """Give *request* a key if its method takes one and it has none. Returns whether it is keyed."""
        if request.method.upper() not in self.methods:
            return False
        if self.header not in request.headers:
            request.headers[self.header] = str(uuid.uuid4())
        return True


class _Retries:
    """Strictly private. The retry decisions for one request, without I/O: after each attempt, ``None`` (stop:
    return the response or raise the error) or how many seconds to wait before the next attempt."""

    def __init__(self, options: _Options, *, keyed: bool, now: float) -> None:
        self.options = options
        self.keyed = keyed
        self.deadline = now + options.max_elapsed
        self.made = 1  # attempts made so far, counting the one being judged
        # Why the last ``None`` stopped an outcome that is retried otherwise; ``None`` if it was not retryable.
        self.gave_up: str | None = None

    def after_error(self, error: httpx.TransportError, now: float) -> float | None:
        retryable = _MAYBE_SENT + _NOT_SENT if self.keyed else _NOT_SENT
        if not isinstance(error, retryable):
            return None
        return self._next(None, now)

    def wants_body(self, response: httpx.Response) -> bool:
        """Whether *response* may be a 503 outcome-unknown, which is never retried: its body must be read to tell
        (the transport then hands on a :func:`_buffered` copy)."""
        return (
            self.keyed
            and response.status_code == 503
            and 503 in self.options.retry_statuses
            and _is_problem(response.headers)
        )

    def after_response(self, response: httpx.Response, now: float) -> float | None:
        if not self.keyed or response.status_code not in self.options.retry_statuses:
            return None
        if isinstance(response.stream, _Buffered) and _is_unknown_problem(response.stream.body):
            # The same answer until the record expires or an operator resolves it: stop now.
            self.gave_up = "the server cannot tell whether the operation ran (outcome-unknown): not retried"
            return None
        return self._next(_retry_after(response), now)

    def _next(self, retry_after: float | None, now: float) -> float | None:
        if self.made >= self.options.attempts:
            self.gave_up = f"giving up after {self.made} attempt{'' if self.made == 1 else 's'}"
            return None
        if retry_after is None:
            ceiling = min(self.options.backoff_cap, self.options.backoff_base * 2 ** (self.made - 1))
            delay = self.options.rng.uniform(0, ceiling)
        else:
            delay = retry_after
        if now + delay > self.deadline:
            # Never sleep past the deadline: give up now with what we have.
            self.gave_up = (
                f"giving up after {self.made} attempt{'' if self.made == 1 else 's'}: waiting {delay:.2f} s more "
                f"would pass max_elapsed ({self.options.max_elapsed:g} s)"
            )
            return None
        self.made += 1
        return delay

    def log(self, request: httpx.Request, reason: str, delay: float | None) -> None:
        """Log the retry of *request* after *delay* seconds because of *reason*; or, when *delay* is ``None``
        and the outcome was one this would have retried, why it was not (see the module docstring)."""
        if delay is None and self.gave_up is None:
            return  # a final answer (a 201, a 400) or an error no retry would mend: nothing to say
        key = request.headers.get(self.options.header) if self.keyed else None
        fields = {
            "idempotency_key": key,
            "attempt": self.made,
            "attempts": self.options.attempts,
            "reason": reason,
            "wait": delay,
        }
        url = request.url
        target = f"{request.method} {url.scheme}://{url.netloc.decode('ascii')}{url.path}"
        keyed = f"{self.options.header} {key!r}" if key is not None else f"no {self.options.header}"
        if delay is not None:
            logger.info(
                "idempo: %s (%s): %s; retrying in %.2f s, attempt %d of %d",
                target, keyed, reason, delay, self.made, self.options.attempts, extra=fields,
            )  # fmt: skip
        else:
            logger.warning("idempo: %s (%s): %s; %s", target, keyed, reason, self.gave_up, extra=fields)


def _error_reason(error: httpx.TransportError) -> str:
    """An error as a log line's reason: its class, and its message when it has one."""
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _status_reason(response: httpx.Response) -> str:
    return f"{response.status_code} {response.reason_phrase}".rstrip()


def is_outcome_unknown(response: httpx.Response) -> bool:
    """Whether *response* is idempo's 503 *outcome-unknown* problem: the server cannot tell whether the operation
    of this key happened (an upstream timed out after the request was sent, say), and will not run it again.

    Keep the key: a new one would run the operation a second time. The answer stays the same until the record
    expires (``Retry-After`` says when) or the service's operator resolves it (``idempo keys resolve``); tell the
    user that the operation may have happened, rather than that it failed.

    The body must have been read (``response.read()``; a client that does not stream has read it). Any problem
    ``type`` ending with ``outcome-unknown`` matches, so that a server's own ``problem_base_uri`` does too.

    .. versionadded:: 0.1.0
    """
    return response.status_code == 503 and _is_problem(response.headers) and _is_unknown_problem(response.content)


def _is_problem(headers: httpx.Headers) -> bool:
    media_type = str(headers.get("Content-Type", "")).partition(";")[0].strip().lower()
    return media_type == "application/problem+json"


def _is_unknown_problem(body: bytes) -> bool:
    """Whether *body* (of a 503 problem+json response) is an outcome-unknown problem document. Anything that cannot
    be read as one, a body that is not JSON included, is not."""
    try:
        document = json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    kind = document.get("type") if isinstance(document, dict) else None
    return isinstance(kind, str) and kind.endswith("outcome-unknown")


class _Buffered(httpx.ByteStream):
    """Strictly private. A response body the transport read whole (and decoded) to look at it, handed on unread."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.body = body


_REENCODED: Final = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def _buffered(response: httpx.Response, body: bytes) -> httpx.Response:
    """A fresh, unread response with *response*'s status, headers and decoded *body*, for the client to read as
    it reads any other (so that it times it, decodes it and closes it as usual). The headers that described the
    body's encoding on the wire are replaced by its length."""
    headers = [(name, value) for name, value in response.headers.multi_items() if name.lower() not in _REENCODED]
    headers.append(("Content-Length", str(len(body))))
    return httpx.Response(response.status_code, headers=headers, stream=_Buffered(body), extensions=response.extensions)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from the response's ``Retry-After``, or ``None`` if it has none we can read.

    An HTTP-date is measured from the response's own ``Date`` when it has one (both are the server's clock, so
    a skewed local clock does not matter), else from the local clock. A date in the past means now.
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    now = _http_date(response.headers.get("Date", "")) or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _http_date(value: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class IdempotencyTransport(httpx.BaseTransport):
    """A sync httpx transport that keys mutating requests and retries them with the same key.

    Args:
        transport: The transport that sends each attempt; ``httpx.HTTPTransport()`` when omitted. Closing this
            transport closes it.
        header: The key header to add.
        methods: The methods that get a key and are retried on responses and on errors after which the request
            may have been sent.
        retry_statuses: The statuses a keyed request is retried on.
        attempts: The most attempts per request, the first included.
        backoff_base: Seconds; the jitter ceiling before the first retry, doubling for each further one.
        backoff_cap: Seconds; the most the jitter ceiling grows to.
        max_elapsed: Seconds after the request began past which no wait may end; a wait that would is not made.
        sleep: Called to wait between attempts; pass ``lambda _: None`` in tests.
        clock: Monotonic seconds, for the deadline.
        rng: The source of jitter.

    Raises:
        ConfigurationError: If an option is out of range (a ``ValueError`` too).
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        header: str = "Idempotency-Key",
        methods: Collection[str] = DEFAULT_METHODS,
        retry_statuses: Collection[int] = DEFAULT_RETRY_STATUSES,
        attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        max_elapsed: float = 30.0,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._transport = transport if transport is not None else httpx.HTTPTransport()
        self._options = _Options.make(
            header=header,
            methods=methods,
            retry_statuses=retry_statuses,
            attempts=attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_elapsed=max_elapsed,
            rng=rng,
        )
        self._sleep = sleep
        self._clock = clock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request*, keyed if its method takes a key, retrying as the module docstring describes."""
        keyed = self._options.prepare(request)
        request.read()  # every attempt sends the same bytes
        retries = _Retries(self._options, keyed=keyed, now=self._clock())
        while True:
            try:
                response = self._transport.handle_request(request)
                if retries.wants_body(response):
                    response = _buffered(response, _read(response))
            except httpx.TransportError as error:
                delay = retries.after_error(error, self._clock())
                retries.log(request, _error_reason(error), delay)
                if delay is None:
                    raise
            else:
                delay = retries.after_response(response, self._clock())
                retries.log(request, _status_reason(response), delay)
                if delay is None:
                    return response
                _discard(response)
            self._sleep(delay)

    def close(self) -> None:
        """Close the wrapped transport."""
        self._transport.close()


class AsyncIdempotencyTransport(httpx.AsyncBaseTransport):
    """An async httpx transport that keys mutating requests and retries them with the same key.

    The same as :class:`IdempotencyTransport`, around ``httpx.AsyncHTTPTransport()`` by default (or any async
    transport, e.g. ``httpx.ASGITransport(app)``), with an async *sleep*: ``asyncio.sleep`` unless given (under
    trio, pass ``sleep=trio.sleep``).
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        header: str = "Idempotency-Key",
        methods: Collection[str] = DEFAULT_METHODS,
        retry_statuses: Collection[int] = DEFAULT_RETRY_STATUSES,
        attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        max_elapsed: float = 30.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._options = _Options.make(
            header=header,
            methods=methods,
            retry_statuses=retry_statuses,
            attempts=attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            max_elapsed=max_elapsed,
            rng=rng,
        )
        self._sleep = sleep
        self._clock = clock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request*, keyed if its method takes a key, retrying as the module docstring describes."""
        keyed = self._options.prepare(request)
        await request.aread()
        retries = _Retries(self._options, keyed=keyed, now=self._clock())
        while True:
            try:
                response = await self._transport.handle_async_request(request)
                if retries.wants_body(response):
                    response = _buffered(response, await _aread(response))
            except httpx.TransportError as error:
                delay = retries.after_error(error, self._clock())
                retries.log(request, _error_reason(error), delay)
                if delay is None:
                    raise
            else:
                delay = retries.after_response(response, self._clock())
                retries.log(request, _status_reason(response), delay)
                if delay is None:
                    return response
                await _adiscard(response)
            await self._sleep(delay)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self._transport.aclose()


def _read(response: httpx.Response) -> bytes:
    """The decoded body of *response*, which is closed afterwards even if reading fails."""
    try:
        return response.read()
    finally:
        response.close()


async def _aread(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    finally:
        await response.aclose()


def _discard(response: httpx.Response) -> None:
    """Read and close a response we are about to retry, so that its connection can be reused."""
    try:
        response.read()
    except httpx.TransportError:
        pass  # the connection is broken anyway; closing releases it
    finally:
        response.close()


async def _adiscard(response: httpx.Response) -> None:
    try:
        await response.aread()
    except httpx.TransportError:
        pass
    finally:
        await response.aclose()
