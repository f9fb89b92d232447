"""The decision table of the HTTP contract (SPEC section 3), as pure functions.

Theory of operation: a request with a key first *claims* it in the store, which atomically either takes the
key (``Acquired``: run the operation) or returns the record already there (``Existing``). ``decide`` turns that
record into exactly one answer, and ``should_store`` says, once the operation produced a status, whether that
response is kept for replay or the claim is released so that a retry runs the operation again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .codec import OutcomeUnknownMarker, decode_marker, encode_not_stored
from .errors import InProgressError, KeyReuseError, OutcomeUnknownError, ResponseNotStoredError
from .records import Record, State

__all__ = [
    "Conflict",
    "Decision",
    "Mismatch",
    "NotStored",
    "Replay",
    "Unknown",
    "decide",
    "fallback",
    "is_marker",
    "should_store",
]

# Statuses that say "the operation did not happen, try again": never stored, the claim is released.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 409, 425, 429})


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
        if marker is not None:
            return NotStored(marker.status, marker.reason)
    return Replay(payload)


_MARKERS = (b"\x02", b"\x03")


def should_store(status: int, *, store_server_errors: bool = False) -> bool:
    """Whether a response with *status* is kept for replay (``True``) or its claim released (``False``).

    5xx means the operation failed and may be retried (unless *store_server_errors*, Stripe's choice); 408,
    409, 425 and 429 mean it did not happen. Everything else, 2xx, 3xx and the other 4xx, is the outcome.
    """
    if status >= 500:
        return store_server_errors
    return status not in RETRYABLE_CLIENT_STATUSES


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
