"""The decision table of the HTTP contract (SPEC section 3): every row, as pure functions, in the order a request
meets them. The faces (the ASGI middleware, ``@idempotent``, the proxy) read bytes and call stores; what they answer
is decided here, and nowhere else. :data:`ROWS` lists the rows as the README's contract table shows them.

A keyed request, in order:

1. **Admission** (:func:`admit`, :func:`body_too_large`): a missing key where one is required, two keys or a
   malformed one, a body over the limit: a 400 or a 413, and the app is not called.
2. **The claim** finds the key free (run the operation) or a record there, which :func:`decide` (or, for a record
   this process cached, :func:`decide_cached`) turns into one answer: the replay, a 422, a 409 (or, with
   ``on_conflict="wait"``, a bounded wait: :func:`wait_or_answer`), the 410 of a response that was not kept, or the
   503 of an outcome that is unknown. A store that fails is :func:`on_store_failure`: a 503, or the app unprotected.
3. **The outcome**: once the operation produced a status, :func:`should_store` says whether its response is kept,
   and :func:`record_for` what the key is completed with (the response, or a marker), or that it is released;
   :func:`fallback` is what a full store gets instead.
4. **A replay** (:func:`replay`) is the stored response as it was, or the problem of one that cannot be read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, cast

from .codec import (
    OutcomeUnknownMarker,
    TooLargeMarker,
    UnsendableResponse,
    decode_marker,
    decode_parts,
    encode_app_response,
    encode_not_stored,
    encode_outcome_unknown,
    encode_too_large,
)
from .errors import (
    BodyTooLargeError,
    InProgressError,
    InvalidKeyError,
    KeyReuseError,
    MissingKeyError,
    OutcomeUnknownError,
    RequestError,
    ResponseNotStoredError,
)
from .keys import parse_key
from .policy import Policy
from .problem import Problem
from .records import Record, State

__all__ = [
    "ROWS",
    "Admit",
    "Conflict",
    "Decision",
    "FailOpen",
    "Mismatch",
    "NotStored",
    "Passthrough",
    "Refuse",
    "Replay",
    "Row",
    "Unavailable",
    "Unknown",
    "Wait",
    "admit",
    "body_too_large",
    "decide",
    "decide_cached",
    "fallback",
    "is_marker",
    "next_record_pause",
    "on_store_failure",
    "record_for",
    "record_response",
    "render_rows",
    "replay",
    "replayable",
    "should_store",
    "wait_or_answer",
]

# Statuses that say "the operation did not happen, try again": never stored, the claim is released.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 409, 425, 429})
WAIT_FIRST: Final = 0.02
"""The first pause of a wait for the first request (``on_conflict="wait"``); each next one doubles, up to
:data:`WAIT_MAX`."""
WAIT_MAX: Final = 0.5


# -- 1. admission ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not a keyed request, and none is required: the app runs as if idempo were not there."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """A 400 or 413 problem; the app is not called."""

    error: RequestError


Admit = str
"""A keyed request, admitted: its key (its body is read next, and its key claimed)."""

PASSTHROUGH: Final = Passthrough()


def admit(policy: Policy, keys: Sequence[bytes], path: str) -> Passthrough | Refuse | Admit:
    """What a request of a protected method gets, given the values of its key headers (*keys*, as sent): its key
    (a ``str``: admitted), :data:`PASSTHROUGH`, or a :class:`Refuse`."""
    if len(keys) == 1:
        try:
            return parse_key(keys[0])
        except InvalidKeyError as exc:
            # Kept without its traceback: its frames (and theirs, up to the server's) would refer back to the
            # answer that holds it, a cycle per refused request left to the garbage collector.
            return Refuse(exc.with_traceback(None))
    if not keys:
        if policy.key_required(path):
            return Refuse(MissingKeyError("this endpoint requires an Idempotency-Key header"))
        return PASSTHROUGH
    return Refuse(InvalidKeyError("send exactly one Idempotency-Key header"))


def body_too_large(policy: Policy, size: int, *, declared: bool = False) -> BodyTooLargeError | None:
    """The 413 of a keyed body of *size* bytes (*declared* by ``Content-Length`` before it is read, or read so far),
    or ``None`` if it fits: the body is buffered to be fingerprinted, so it is bounded."""
    limit = policy.max_request_bytes
    if size <= limit:
        return None
    if declared:
        return BodyTooLargeError(f"the request body is {size} bytes; at most {limit} are accepted")
    return BodyTooLargeError(f"the request body is over {limit} bytes, the most accepted")


# -- 2. the claim's answer ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    """The key completed with this fingerprint: answer with the stored payload; do not run anything."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was first used with another request: 422, nothing runs, nothing is replayed."""

    def error(self) -> KeyReuseError:
        """The error to raise or render."""
        return KeyReuseError("this Idempotency-Key was already used with a different request; use a new key")


@dataclass(frozen=True, slots=True)
class Conflict:
    """The first request with this key is still running: 409 with ``Retry-After``, or wait for it."""

    retry_after: int

    def error(self) -> InProgressError:
        """The error to raise or render."""
        return InProgressError(
            "a request with this Idempotency-Key is still being processed; retry later with the same key",
            retry_after=self.retry_after,
        )


@dataclass(frozen=True, slots=True)
class NotStored:
    """The key completed, but only a marker was kept in place of its response: 410, nothing runs again."""

    status: int
    reason: str

    def error(self) -> ResponseNotStoredError:
        """The error to raise or render."""
        why = _NOT_STORED_WHY.get(self.reason, "it was not stored")
        return ResponseNotStoredError(
            f"the request with this Idempotency-Key completed with status {self.status}, but {why}; "
            "it was not run again",
            original_status=self.status,
            reason=self.reason,
        )


_NOT_STORED_WHY = {
    "too_large": "its response was too large to store",
    "store_refused": "the store was full and kept only this mark of it",
    "unsendable": "its response could not be sent as it was, so it was not stored",
    "unserializable": "its result could not be serialised",
    "unreadable": "the stored copy of its response cannot be read",
    "operator": "an operator recorded that it ran, without its response",
}


@dataclass(frozen=True, slots=True)
class Unknown:
    """Whether the first request's operation happened is unknown: 503 with ``Retry-After``; nothing runs again
    until the record expires or an operator resolves it."""

    retry_after: int

    def error(self) -> OutcomeUnknownError:
        """The error to raise or render."""
        return OutcomeUnknownError.recorded(
            "the outcome of the request with this Idempotency-Key is unknown (it may have taken effect), so it "
            "is not run again; keep the key, and retry later or ask the service to resolve it",
            retry_after=self.retry_after,
        )


Decision = Replay | Mismatch | Conflict | NotStored | Unknown
MISMATCH: Final = Mismatch()


def decide(record: Record, fingerprint: str, *, now: float, retry_after: float = 1.0) -> Decision:
    """Decide what a request with *fingerprint* gets, given the live *record* ``claim`` found.

    Args:
        record: the record already under the key (never expired: stores treat expired records as absent).
        fingerprint: the fingerprint of the request being decided.
        now: the current time, in seconds since the epoch.
        retry_after: the longest ``Retry-After`` to suggest while the first request runs; it is shortened to
            the remaining lease when that is sooner, and never goes under one second.

    Returns:
        ``Mismatch`` if the key was used for another request, ``Conflict`` if that request is still running,
        ``Unknown`` if its outcome is unknown (``Retry-After``: until the record expires), ``NotStored`` if it
        completed without its response being kept, ``Replay`` if its response is stored.
    """
    if record.fingerprint != fingerprint:
        return Mismatch()
    payload = record.payload
    if record.state is State.IN_PROGRESS or payload is None:
        remaining = record.lease_expires_at - now
        return Conflict(max(1, math.ceil(min(retry_after, remaining))))
    if is_marker(payload):
        try:
            marker = decode_marker(payload)
        except ValueError:  # a corrupt record: it did complete, so nothing runs again
            return NotStored(0, "unreadable")
        if isinstance(marker, OutcomeUnknownMarker):
            return Unknown(max(1, math.ceil(record.expires_at - now)))
        stored = cast(TooLargeMarker, marker)  # a payload that is_marker is one (decode_marker never says None)
        return NotStored(stored.status, stored.reason)
    return Replay(payload)


_MARKERS = (b"\x02", b"\x03")
_COMPLETED: Final = State.COMPLETED


def replayable(record: Record, fingerprint: str) -> bytes | None:
    """:func:`decide`'s most common answer, found first: the stored response to replay (its payload, as it is: no
    :class:`Replay` is made on this path), where :func:`decide` would answer ``Replay`` of a response; ``None``
    otherwise (then ask :func:`decide`)."""
    payload = record.payload
    if payload is not None and payload[:1] == b"\x01" and record.fingerprint == fingerprint:
        return payload if record.state is _COMPLETED else None
    return None


def decide_cached(cached_fingerprint: str, payload: bytes, fingerprint: str) -> bytes | Mismatch:
    """:func:`decide` for a completed record this process cached (only responses are cached, never markers): the
    payload to replay (as it is: no :class:`Replay` made on this, the fastest path), or the mismatch."""
    return payload if cached_fingerprint == fingerprint else MISMATCH


@dataclass(frozen=True, slots=True)
class Wait:
    """With ``on_conflict="wait"``: pause *seconds*, then claim again."""

    seconds: float


def wait_or_answer(policy: Policy, conflict: Conflict, *, waited: float, delay: float) -> Wait | Conflict:
    """While the first request runs: the 409 (*conflict*), or, with ``on_conflict="wait"``, a pause before claiming
    again, as long as the wait (*waited* seconds so far) stays within ``wait_timeout``. *delay* is the previous
    pause (``0`` before the first): pauses start at :data:`WAIT_FIRST` and double up to :data:`WAIT_MAX`."""
    if policy.on_conflict != "wait":
        return conflict
    pause = WAIT_FIRST if delay <= 0 else min(delay * 2, WAIT_MAX)
    if waited + pause > policy.wait_timeout:
        return conflict
    return Wait(pause)


@dataclass(frozen=True, slots=True)
class FailOpen:
    """The store failed and ``on_store_error="fail_open"``: run the app unprotected (and log it)."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The store failed (fail closed): a 503 with ``Retry-After``; nothing runs."""

    retry_after: int

    def problem(self, base_uri: str) -> Problem:
        """The problem document to answer."""
        return Problem.service_unavailable(
            "the idempotency store is unavailable; retry later with the same key", base_uri=base_uri
        )


def on_store_failure(policy: Policy) -> FailOpen | Unavailable:
    """What a request gets when the store fails on its claim."""
    if policy.on_store_error == "fail_open":
        return FailOpen()
    return Unavailable(policy.retry_after)


# -- 3. the outcome -------------------------------------------------------------------------------------------------


def should_store(status: int, *, store_server_errors: bool = False) -> bool:
    """Whether a response with *status* is kept for replay (``True``) or its claim released (``False``).

    5xx means the operation failed and may be retried (unless *store_server_errors*, Stripe's choice); 408,
    409, 425 and 429 mean it did not happen. Everything else, 2xx, 3xx and the other 4xx, is the outcome.
    """
    if status >= 500:
        return store_server_errors
    return status not in RETRYABLE_CLIENT_STATUSES


class Recorded(NamedTuple):
    """What a key is completed with (*payload*, kept *ttl* seconds); a payload of ``None`` releases it."""

    payload: bytes | None
    ttl: float
    unsendable: UnsendableResponse | None = None


RELEASE: Final = Recorded(None, 0)


def record_for(
    policy: Policy,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    chunks: Iterable[bytes],
    *,
    size: int,
    failed: bool,
    kept: bool,
    too_large: bool,
    unknown: bool,
    head: bool = False,
) -> Recorded:
    """What the key of an operation that answered *status* is completed with, once it is over.

    Args:
        status, headers, chunks, size: the response (its body's chunks as recorded, and their total size).
        failed: the operation raised, or ended without finishing its response.
        kept: :func:`should_store` said so when the response started.
        too_large: the body went over ``max_response_bytes`` (the chunks were dropped).
        unknown: the app said the outcome is unknown (:func:`~idempo.mark_outcome_unknown`).
        head: the request was a HEAD (its response has no body, whatever its ``Content-Length``).

    Returns:
        The "outcome unknown" marker for ``unknown_outcome_ttl`` (it may have happened: never released); a release
        for a failure or a status not kept; the "not stored" marker of a response too large, or one the server
        could not send as it is (``unsendable`` says why); else the response itself, for ``ttl``.
    """
    if unknown:
        return Recorded(encode_outcome_unknown(status), policy.kept_unknown_for)
    if failed or not kept:
        return RELEASE
    if too_large:
        return Recorded(encode_too_large(status), policy.ttl)
    return record_response(policy, status, headers, chunks, size, head)


_new_recorded = tuple.__new__  # builds a Recorded without its Python-level __new__


def record_response(
    policy: Policy,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    chunks: Iterable[bytes],
    size: int,
    head: bool = False,
) -> Recorded:
    """:func:`record_for` of an operation that finished, answering *status*, whose response is kept
    (:func:`should_store`), was recorded whole (``too_large`` false), and whose outcome is known: the most common
    case, without the questions whose answers are known (the faces' way after a response like any other)."""
    try:
        payload = encode_app_response(
            status, headers, chunks, keep_set_cookie=policy.replay_set_cookie, size=size, head=head
        )
    except UnsendableResponse as exc:
        return Recorded(encode_not_stored(status, "unsendable"), policy.ttl, exc)
    return _new_recorded(Recorded, (payload, policy.ttl, None))


def is_marker(payload: bytes) -> bool:
    """Whether *payload* is one of the small markers ("not stored", "outcome unknown") rather than a response or
    a result."""
    return payload[:1] in _MARKERS


def fallback(payload: bytes, status: int) -> bytes | None:
    """What to ``complete`` a key with, once its operation ran, if the store refused *payload*.

    The "not stored" marker of *status*: a few bytes, which a full store still takes where it would not take the
    response (Redis at ``maxmemory``, a full disk: the built-in stores make sure of it), so that a retry learns that
    the operation ran (a 410) rather than run it a second time. ``None`` if *payload* is a marker already: there is
    nothing smaller to fall back to.
    """
    if is_marker(payload):
        return None
    return encode_not_stored(status, "store_refused")


RECORD_RETRY_FIRST: Final = 0.05
"""The first pause before trying again to record an outcome the store did not take (it failed, or the request was
cancelled while it had the call); each next one doubles, up to :data:`RECORD_RETRY_MAX`, for as long as the lease
lasts."""
RECORD_RETRY_MAX: Final = 1.0


def next_record_pause(delay: float) -> float:
    """The pause before the next try to record an outcome, after a pause of *delay* seconds (``0``: the try that
    failed was made at once): :data:`RECORD_RETRY_FIRST`, then twice the last, up to :data:`RECORD_RETRY_MAX`."""
    return min(max(delay * 2, RECORD_RETRY_FIRST), RECORD_RETRY_MAX)


# -- 4. a replay ----------------------------------------------------------------------------------------------------


def replay(payload: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes] | RequestError:
    """The stored response a replay sends (status, a new list of its headers, body), or, for a payload that is a
    marker or cannot be read (corrupt: the operation did run, so it is not run again), the error to answer."""
    try:
        response = decode_parts(payload)
    except ValueError:
        return NotStored(0, "unreadable").error()
    if isinstance(response, tuple):
        return response
    if isinstance(response, OutcomeUnknownMarker):
        return Unknown(1).error()
    return NotStored(response.status, response.reason).error()


# -- the table, as the README shows it -------------------------------------------------------------------------------


class Row(NamedTuple):
    """One row of the contract: the situation, what the client gets, and the function here that decides it."""

    situation: str
    response: str
    decided_by: str


ROWS: Final[tuple[Row, ...]] = (
    Row(
        'key malformed: empty, over 255 characters, not visible ASCII (a quoted `"abc"` is accepted as `abc`), '
        "or sent twice",
        "**400** problem+json; the app is not called",
        "admit",
    ),
    Row("key missing where `require_key` says one is needed", "**400** problem+json", "admit"),
    Row(
        "first request with this key",
        "the app runs; its response streams to the client unchanged while it is recorded",
        "decide",
    ),
    Row(
        "same key, same request, completed",
        "the **stored response**: same status, headers (minus hop-by-hop headers and `Set-Cookie`), byte-identical "
        "body, plus `Idempotent-Replayed: true`; the app is not called",
        "decide",
    ),
    Row("same key, different request (body, path, query or method)", "**422** problem+json; nothing runs", "decide"),
    Row(
        "same key while the first request is still running",
        '**409** problem+json with `Retry-After`; with `on_conflict="wait"`, waits (bounded) and replays',
        "wait_or_answer",
    ),
    Row(
        "the app answers 5xx or raises",
        "nothing stored; the claim is released so a retry runs again (`store_server_errors=True` keeps 5xx, like "
        "Stripe)",
        "should_store",
    ),
    Row(
        "the app answers 408, 409, 425 or 429",
        "nothing stored (the operation did not happen); claim released",
        "should_store",
    ),
    Row("any other status (2xx, 3xx, other 4xx)", "stored and replayed until `ttl` runs out", "record_for"),
    Row("request body over `max_request_bytes`", "**413** problem+json", "body_too_large"),
    Row(
        "the store is unreachable or fails",
        '**503** problem+json with `Retry-After`; `on_store_error="fail_open"` runs the app unprotected and logs '
        "a warning",
        "on_store_failure",
    ),
    Row(
        "the response is over `max_response_bytes`, or the store is full when it is recorded",
        "the client still gets it whole, the operation is never run twice, and a retry gets **410** problem+json "
        "(`original_status` says what the first answer was)",
        "record_for",
    ),
    Row(
        "the app cannot know whether its operation happened (it raises `OutcomeUnknownError`)",
        "the key is kept: retries get **503** `outcome-unknown` with `Retry-After`, never a second run, until it "
        "expires or an operator resolves it",
        "decide",
    ),
    Row(
        "the client disconnects mid-request",
        "the app runs to completion and its response is stored, so the retry gets it",
        "record_for",
    ),
    Row(
        "the process dies mid-request",
        "once the lease (30 s, renewed every 10 s while the app runs) runs out, a retry runs again",
        "decide",
    ),
)
"""The contract's rows, as the README's table shows them (a test keeps the two the same)."""


def render_rows() -> str:
    """:data:`ROWS` as the Markdown table of the README."""
    lines = ["| situation | response |", "|---|---|"]
    lines += [f"| {row.situation} | {row.response} |" for row in ROWS]
    return "\n".join(lines)
