"""What a record is, for a person: its parts, state and status, a table row, a JSON object, the lines of ``show``,
with everything that comes from the store escaped so that it can never drive the terminal. Strictly private to
``idempo keys``."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._core.codec import (
    OutcomeUnknownMarker,
    StoredResponse,
    TooLargeMarker,
    decode_marker,
    decode_response,
    decode_value,
)
from .._core.fingerprint import principal_digest
from .._core.records import Record, State

_MIDDLEWARE_KEY = re.compile(r"(?P<principal>[0-9a-f]{32}):(?P<key>.*)", re.DOTALL)
_SHORT = 8  # characters of a principal digest shown in the table

ANONYMOUS = principal_digest(b"")
"""The principal digest of a request with no principal: no authenticated user and no ``Authorization`` header
(``e3b0c442...``, the digest of nothing). Every such caller shares its records' namespace."""
ANONYMOUS_LABEL = "(anonymous)"

# What must never reach the terminal raw: C0 controls and DEL, C1 controls (U+0080-U+009F: 0x9b is a CSI of its own
# on some terminals), the bidirectional marks, embeddings, overrides and isolates (text that reads otherwise than it
# is), and the line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, *, multiline: bool = False) -> str:
    """*text* from the store, fit for a terminal: every control character written as an escape, ``\\x1b`` or
    ``\\u202e``; with *multiline* (a body shown as text), newlines and tabs are kept."""
    return (_UNSAFE_IN_TEXT if multiline else _UNSAFE).sub(_escape, text)


# -- what a record is, for a person --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parts:
    """A store key, split: its kind (``http``, ``fn`` or ``other``), whose it is, and the key proper."""

    kind: str
    owner: str  # the principal digest, "fn:<namespace>", or ""
    key: str


def split_key(store_key: str) -> _Parts:
    match = _MIDDLEWARE_KEY.fullmatch(store_key)
    if match is not None:
        return _Parts("http", match["principal"], match["key"])
    if store_key.startswith("fn:"):
        namespace, colon, key = store_key[3:].partition(":")
        if colon:
            return _Parts("fn", f"fn:{namespace}", key)
    return _Parts("other", "", store_key)


def marker_of(record: Record) -> TooLargeMarker | OutcomeUnknownMarker | None:
    """The marker a completed record holds in place of its response or result, if it holds one."""
    if record.state is not State.COMPLETED or record.payload is None:
        return None
    return decode_marker(record.payload)


def state_text(record: Record, now: float) -> str:
    """The record's state, for a person: ``in progress``, ``stale``, ``completed``, ``outcome unknown (first
    answered 504)`` or ``completed, response not stored (too_large)``."""
    if record.state is State.IN_PROGRESS:
        return "stale" if record.lease_expires_at <= now else "in progress"
    marker = marker_of(record)
    if isinstance(marker, OutcomeUnknownMarker):
        return "outcome unknown" + (f" (first answered {marker.status})" if marker.status else "")
    if isinstance(marker, TooLargeMarker):
        what = "result" if split_key(record.key).kind == "fn" else "response"
        return f"completed, {what} not stored ({marker.reason})"
    return "completed"


def _decoded(record: Record) -> StoredResponse | TooLargeMarker | OutcomeUnknownMarker | str | None:
    """The stored response of a completed middleware record; a message if it cannot be read; else ``None``."""
    if record.payload is None or split_key(record.key).kind == "fn":
        return None
    try:
        return decode_response(record.payload)
    except ValueError as exc:
        return f"not a stored response ({exc})"


def _status(record: Record) -> str:
    if record.state is State.IN_PROGRESS or isinstance(marker_of(record), OutcomeUnknownMarker):
        return "-"  # no response stored: none yet, or none to be had
    if split_key(record.key).kind == "fn":
        return "fn"  # a function's result: no HTTP status
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        return str(response.status)
    if isinstance(response, TooLargeMarker):
        return f"{response.status}*"  # completed, but the response was not kept
    return "?"


def _duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``; ``-`` once past."""
    if seconds < 0:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def when_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def record_json(record: Record, now: float) -> dict[str, Any]:
    parts = split_key(record.key)
    status = _status(record)
    marker = marker_of(record)
    unknown = isinstance(marker, OutcomeUnknownMarker)
    return {
        "store_key": record.key,
        "key": parts.key,
        "kind": parts.kind,
        "principal": parts.owner if parts.kind == "http" else None,
        "anonymous": parts.kind == "http" and parts.owner == ANONYMOUS,
        "namespace": parts.owner[3:] if parts.kind == "fn" else None,
        "state": "outcome_unknown" if unknown else record.state.value,
        "state_text": state_text(record, now),
        "stale": record.state is State.IN_PROGRESS and record.lease_expires_at <= now,
        "status": int(status.rstrip("*")) if status.rstrip("*").isdigit() else None,
        "first_status": (marker.status or None) if isinstance(marker, OutcomeUnknownMarker) else None,
        "not_stored_reason": marker.reason if isinstance(marker, TooLargeMarker) else None,
        "fingerprint": record.fingerprint,
        "created_at": record.created_at,
        "lease_expires_at": record.lease_expires_at if record.state is State.IN_PROGRESS else None,
        "expires_at": record.expires_at,
        "age_seconds": round(now - record.created_at, 3),
        "expires_in_seconds": round(record.expires_at - now, 3),
        "payload_bytes": None if record.payload is None else len(record.payload),
    }


def table_lines(records: list[Record], now: float) -> list[str]:
    header = ("KEY", "PRINCIPAL", "STATE", "STATUS", "AGE", "EXPIRES IN")
    rows = [header]
    for record in records:
        parts = split_key(record.key)
        owner = _principal_cell(parts) if parts.kind == "http" else (parts.owner or "-")
        age, expires_in = _duration(now - record.created_at), _duration(record.expires_at - now)
        rows.append((safe(parts.key), safe(owner), state_text(record, now), _status(record), age, expires_in))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _principal_cell(parts: _Parts) -> str:
    return ANONYMOUS_LABEL if parts.owner == ANONYMOUS else parts.owner[:_SHORT]


def stored_body(record: Record) -> bytes:
    """What ``--body`` prints: the response's body, a function's serialised result, or the whole payload (an
    unreadable one); nothing for a marker."""
    payload = record.payload or b""
    if marker_of(record) is not None:
        return b""
    if split_key(record.key).kind == "fn":
        with suppress(ValueError):  # a result the decorator framed; else shown whole
            value = decode_value(payload)
            return value if isinstance(value, bytes) else b""
        return payload
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        return response.body
    return payload


def as_text(content: bytes) -> str | None:
    try:
        return content.decode()
    except UnicodeDecodeError:
        return None


def show_lines(record: Record, now: float, *, body: bool) -> Iterator[str]:
    parts = split_key(record.key)
    yield f"store key:    {safe(record.key)}"
    yield f"key:          {safe(parts.key)}"
    if parts.kind == "http":
        anonymous = " (anonymous: no user, no Authorization header)" if parts.owner == ANONYMOUS else ""
        yield f"principal:    {parts.owner}{anonymous}"
    elif parts.kind == "fn":
        yield f"function:     {safe(parts.owner[3:])} (an @idempotent function's result)"
    state = state_text(record, now)
    if state == "stale":
        state = f"in progress, stale: its lease ran out {_duration(now - record.lease_expires_at)} ago"
    elif record.state is State.IN_PROGRESS:
        state = f"in progress, lease ends in {_duration(record.lease_expires_at - now)}"
    yield f"state:        {state}"
    yield f"fingerprint:  {safe(record.fingerprint)}"
    yield f"created:      {when_text(record.created_at)} ({_duration(now - record.created_at)} ago)"
    yield f"expires:      {when_text(record.expires_at)} (in {_duration(record.expires_at - now)})"
    if record.payload is None:
        return
    marker = marker_of(record)
    if isinstance(marker, OutcomeUnknownMarker):
        yield (
            "retries get:  503 outcome-unknown, nothing runs, until the record expires or is resolved "
            "(idempo keys resolve --ran or --not-run)"
        )
        return
    if isinstance(marker, TooLargeMarker):
        if parts.kind != "fn":
            yield f"status:       {marker.status}"
        what = "result" if parts.kind == "fn" else "body"
        yield f"{what + ':':<14}not kept ({marker.reason}); retries get a 410 response-not-stored, not a replay"
        return
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        yield f"status:       {response.status}"
        yield "headers:" if response.headers else "headers:      (none)"
        for name, value in response.headers:
            yield f"  {safe(name.decode('latin-1'))}: {safe(value.decode('latin-1'))}"
        yield f"body:         {_size(response.body, body=body)}"
    elif isinstance(response, str):
        yield f"payload:      {safe(response)}; {_size(record.payload, body=body)}"
    else:
        yield f"result:       {_size(stored_body(record), body=body)}"


def _size(content: bytes, *, body: bool) -> str:
    """``28 bytes (--body to print it)``; with *body*, what follows: ``28 bytes:`` or ``11 bytes, binary, in
    base64:``."""
    size = f"{len(content)} byte{'' if len(content) == 1 else 's'}"
    if not content:
        return size
    if not body:
        return f"{size} (--body to print it)"
    return f"{size}:" if as_text(content) is not None else f"{size}, binary, in base64:"


def show_json(record: Record, now: float, *, body: bool) -> dict[str, Any]:
    shown = record_json(record, now)
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        shown["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers]
    marker = marker_of(record)
    shown["too_large"] = isinstance(marker, TooLargeMarker) and marker.reason == "too_large"
    if body and record.payload is not None:
        content = stored_body(record)
        text = as_text(content)
        shown["body"] = text
        shown["body_base64"] = base64.b64encode(content).decode() if text is None else None
    return shown
