"""What the proxy accepts of a request before the middleware sees it: its target, its framing, and, for a keyed
request, how long its body may take and how much memory the bodies being buffered may hold. Strictly private.

Theory of operation. Everything here runs in front of the middleware, so that what the middleware checks (the
``require_key`` predicate, the fingerprint) and what the upstream is sent are the same request:

* **The target** must be a path (origin-form, RFC 9112 section 3.2.1). Anything else would become part of the
  upstream URL in a way the operator never meant: ``@evil:6000/x`` (the upstream's host turned into userinfo),
  ``http://other/x`` (absolute-form, meant for a forward proxy), ``*`` (asterisk-form). ``OPTIONS *`` is the one
  exception, answered by the proxy itself (see ``ProxyApp``); every other such target is a 400.
* **Dot segments** (``.`` and ``..``, RFC 3986 section 5.2.4) are refused, not resolved: a path that has one,
  literally or percent-encoded (``%2e``), also when ``%2F`` or ``\\`` (or ``%5C``) separates it, or with ``;``
  parameters after it (``..;``), is a 400. The checks would otherwise see one path and the upstream, after its own
  normalisation, another (``/./payments/x`` past ``--require-key-path /payments/``; ``/../x`` out of an upstream
  base path). Clients never send them: browsers and HTTP libraries resolve dot segments before sending.
* **Framing**: ``Content-Length`` together with ``Transfer-Encoding`` is a 400 and the connection is closed (RFC
  9112 section 6.1: the mark of a request smuggling attempt).
* **Keyed bodies** are buffered by the middleware, to be fingerprinted. The proxy hands the middleware a ``receive``
  (:class:`KeyedBody`) that gives the whole body ``body_timeout`` seconds to arrive, and counts what it holds in a
  budget shared by the process (:class:`BodyBudget`, ``max_buffered_bytes``). When either runs out, the middleware
  is told that the client left (``http.disconnect``: it has claimed nothing yet, and returns), and the proxy answers
  408 or 503 and closes the connection.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote_to_bytes

from ..asgi import Message, Receive, Scope

__all__ = ["OVER_BUDGET", "TIMED_OUT", "BodyBudget", "KeyedBody", "Refusal", "framing_refusal", "request_target"]

_SEPARATORS: Final = re.compile(rb"[/\\]")
_DOT_SEGMENTS: Final = frozenset({b".", b".."})
# What a server hands the app, decoded, as scope["path"], and may not as raw_path: characters a path may hold as is.
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the proxy answers itself with a problem document, without forwarding it. Strictly private."""

    status: int
    slug: str
    title: str
    detail: str


def _invalid_target(detail: str) -> Refusal:
    return Refusal(400, "invalid-target", "Request target not accepted", detail)


def request_target(scope: Scope) -> bytes | Refusal:
    """The request's path and query (``b"/a/b?c=d"``) as the client sent them, checked: an origin-form path without
    dot segments; or why not."""
    raw = scope.get("raw_path")
    if not raw:  # servers need not pass raw_path: rebuild it from the decoded path
        raw = quote(scope["path"], safe=_PATH_SAFE).encode("ascii")
    if not raw.startswith(b"/"):
        if b"://" in raw:
            return _invalid_target(
                "absolute-form targets (requests meant for a forward proxy) are not accepted: send the path only"
            )
        return _invalid_target("the request target must be a path that starts with '/'")
    if (b"." in raw or b"%" in raw) and _has_dot_segment(raw):
        return _invalid_target("the path has a '.' or '..' segment: send it with dot segments resolved")
    query: bytes = scope.get("query_string", b"")
    return raw + b"?" + query if query else raw


def _has_dot_segment(raw: bytes) -> bool:
    segments = _SEPARATORS.split(unquote_to_bytes(raw))
    return any(segment.partition(b";")[0] in _DOT_SEGMENTS for segment in segments)


def framing_refusal(headers: dict[bytes, bytes]) -> Refusal | None:
    """A 400 for a request whose body is framed two ways (``Content-Length`` and ``Transfer-Encoding``)."""
    if b"transfer-encoding" in headers and b"content-length" in headers:
        detail = "Content-Length and Transfer-Encoding in one request (RFC 9112 section 6.1): send one of them"
        return Refusal(400, "invalid-framing", "Request framing not accepted", detail)
    return None


class BodyBudget:
    """The bytes of keyed request bodies this process holds while it buffers and forwards them, and the most it may
    hold (``max_buffered_bytes``), shown on *gauge* (a Prometheus gauge). Strictly private."""

    __slots__ = ("gauge", "limit", "used")

    def __init__(self, limit: int, gauge: Any = None) -> None:
        self.limit = limit
        self.used = 0
        self.gauge = gauge

    def take(self, size: int) -> bool:
        """Hold *size* more bytes, if they fit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        if self.gauge is not None:
            self.gauge.inc(size)
        return True

    def give_back(self, size: int) -> None:
        if size:
            self.used -= size
            if self.gauge is not None:
                self.gauge.dec(size)


TIMED_OUT: Final = Refusal(
    408, "body-timeout", "Request body too slow", "the request body did not arrive in time; send it again"
)
OVER_BUDGET: Final = Refusal(
    503,
    "proxy-busy",
    "Too many request bodies in flight",
    "the proxy holds as many request bodies as it may; retry with the same key later",
)


class KeyedBody:
    """The ``receive`` the middleware reads a keyed request's body through: the server's, with a deadline for the
    whole body, and every byte of it counted in the process's :class:`BodyBudget` until :meth:`close`.

    If the deadline passes or the budget is spent, it answers ``http.disconnect`` (the middleware then returns
    without having claimed the key) and :attr:`refusal` says what the client should be told. Strictly private.
    """

    __slots__ = ("budget", "deadline", "held", "reading", "receive", "received", "refusal")

    def __init__(self, receive: Receive, budget: BodyBudget, timeout: float, held: int = 0) -> None:
        self.receive = receive
        self.budget = budget
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.held = held  # bytes taken from the budget (the declared Content-Length, taken up front)
        self.received = 0
        self.reading = True  # until the last chunk of the body (or a disconnect) has been handed on
        self.refusal: Refusal | None = None

    async def __call__(self) -> Message:
        if not self.reading:
            return await self.receive()  # the body is in: later messages (a disconnect) may take as long as they take
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.receive()
        except TimeoutError:
            return self._refuse(TIMED_OUT)
        if message["type"] != "http.request":
            self.reading = False
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.held:
            if not self.budget.take(self.received - self.held):
                return self._refuse(OVER_BUDGET)
            self.held = self.received
        if not message.get("more_body", False):
            self.reading = False
        return message

    def _refuse(self, refusal: Refusal) -> Message:
        self.refusal = refusal
        self.reading = False
        return {"type": "http.disconnect"}

    def close(self) -> None:
        """The request is over: its body no longer counts against the budget."""
        self.budget.give_back(self.held)
        self.held = 0
