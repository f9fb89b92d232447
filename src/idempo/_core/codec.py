"""The stored form of an HTTP response, and its byte encoding.

Stores keep payloads as opaque bytes. A response is encoded as a version byte, a small fixed header and the
body appended as it is, so that a multi-megabyte body is never re-encoded (no base64, no JSON escaping)::

    b"\\x01" | status u16 | header count u16 | (name length u16 | value length u32 | name | value)* | body

Two markers take a response's place, so that an operation that ran (or may have run) is never run twice:

- *not stored*: the operation completed with ``status``, but its response could not be kept (too large, the store
  refused it, the server could not send it, a decorated function's result could not be serialised)::

      b"\\x02" | status u16 | reason u8        (a marker of 3 bytes, from before the reason, is "too large")

- *outcome unknown*: the operation may or may not have happened (an upstream timed out after the request was sent,
  a handler reported that a downstream call's result is unknown); ``status`` is what the first client was told::

      b"\\x03" | status u16

The decorator's results are framed the same way: ``b"\\x04"`` and the serializer's bytes, or one of the markers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "NOT_STORED_REASONS",
    "NotStoredReason",
    "OutcomeUnknownMarker",
    "StoredResponse",
    "TooLargeMarker",
    "decode_marker",
    "decode_parts",
    "decode_response",
    "decode_value",
    "encode_app_response",
    "encode_not_stored",
    "encode_outcome_unknown",
    "encode_response",
    "encode_too_large",
    "encode_value",
    "UnsendableResponse",
    "storable_headers",
]

_RESPONSE = 1
_NOT_STORED = 2
_UNKNOWN = 3
_VALUE = 4
_HEAD = struct.Struct(">BHH")
_FIELD = struct.Struct(">HI")
_MARKER = struct.Struct(">BH")
_NOT_STORED_MARKER = struct.Struct(">BHB")

NotStoredReason = Literal["too_large", "store_refused", "unsendable", "unserializable", "unreadable", "operator"]
"""Why a completed operation's response (or result) was not kept:

- ``too_large``: over ``max_response_bytes``;
- ``store_refused``: the store would not take it (full: Redis at ``maxmemory``, a full disk), so only this marker was
  written;
- ``unsendable``: the server could not send it as it was (a body on a 204 or 304, a ``Content-Length`` that is not
  the body's length);
- ``unserializable``: a decorated function's result that its serializer cannot store;
- ``unreadable``: the stored payload cannot be decoded (a corrupt record); never written, only reported;
- ``operator``: ``idempo keys resolve --ran`` said that an operation of unknown outcome did happen.
"""
NOT_STORED_REASONS: tuple[NotStoredReason, ...] = (
    "too_large",
    "store_refused",
    "unsendable",
    "unserializable",
    "unreadable",
    "operator",
)

# RFC 9110 section 7.6.1, plus the classic hop-by-hop list of RFC 2616 section 13.5.1. Never replayed.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


_DROPPED_KEEPING_COOKIES = HOP_BY_HOP_HEADERS
_DROPPED = HOP_BY_HOP_HEADERS | {b"set-cookie"}
# Statuses whose responses have no body (RFC 9110 sections 15.2, 15.3.5, 15.4.5).
_BODILESS = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as it is replayed: status, headers (lower-case names, raw bytes) and the whole body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class TooLargeMarker:
    """The operation completed with *status*, but its response was not stored; *reason* says why
    (:data:`NotStoredReason`: ``"too_large"`` when it was over ``max_response_bytes``). A retry gets a 410."""

    status: int
    reason: NotStoredReason = "too_large"


@dataclass(frozen=True, slots=True)
class OutcomeUnknownMarker:
    """The operation may or may not have happened; the first client was answered *status* (``0``: nothing).
    The key stays taken: a retry gets a 503 ``outcome-unknown`` until the record expires or an operator resolves
    it (``idempo keys resolve``)."""

    status: int


def storable_headers(
    headers: Iterable[tuple[bytes, bytes]], *, keep_set_cookie: bool = False
) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of a response that may be replayed: without hop-by-hop headers, nor those ``Connection``
    names, and without ``Set-Cookie`` unless *keep_set_cookie*. Names are lower-cased; order is kept."""
    pairs = [(name.lower(), value) for name, value in headers]
    dropped = _DROPPED_KEEPING_COOKIES if keep_set_cookie else _DROPPED
    for name, value in pairs:
        if name == b"connection":
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return tuple(pair for pair in pairs if pair[0] not in dropped)


def encode_response(status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """Encode a response for the store. *headers* should already be :func:`storable_headers`."""
    parts = [_HEAD.pack(_RESPONSE, status, len(headers))]
    for name, value in headers:
        parts.append(_FIELD.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    parts.append(body)
    return b"".join(parts)


class UnsendableResponse(ValueError):
    """A response a server cannot send as it is (see :func:`encode_app_response`)."""


def encode_app_response(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    chunks: Iterable[bytes],
    *,
    keep_set_cookie: bool = False,
    size: int | None = None,
    head: bool = False,
) -> bytes:
    """``encode_response(status, storable_headers(headers, keep_set_cookie=...), b"".join(chunks))`` in one pass
    over the headers and one copy of the body: the middleware's way to encode what an app answered.

    Given the body's *size*, it also checks, in the same pass, that a server can send the response as it is: no
    body on a 1xx, 204 or 304, and a ``Content-Length`` (if any) that is *size* (unless *head*: a response to HEAD
    has no body, whatever its ``Content-Length``). A response that is not would fail the same way on every replay.

    Raises:
        UnsendableResponse: the response cannot be sent as it is.
    """
    if size and not head and (status in _BODILESS or status < 200):
        msg = f"a {status} response cannot have a body"
        raise UnsendableResponse(msg)
    parts = [b""]
    count = 0
    for raw_name, value in headers:
        known = _NAMES.get(raw_name)
        if known is None:
            known = _name(raw_name)
        kind, name_length, name = known
        if kind:  # not a header stored as it is
            if kind == _SET_COOKIE:
                if not keep_set_cookie:
                    continue
            elif kind == _CONTENT_LENGTH:
                if size is not None and not head:
                    expected = b"%d" % size
                    if value != expected and value.strip() != expected:
                        msg = f"Content-Length {value!r} is not the body's {size} bytes"
                        raise UnsendableResponse(msg)
            elif kind == _CONNECTION:  # it may name more headers to drop, even ones already encoded
                _check_length(headers, size, head)
                stored = storable_headers(headers, keep_set_cookie=keep_set_cookie)
                return encode_response(status, stored, b"".join(chunks))
            else:  # hop-by-hop
                continue
        value_length = len(value)
        if value_length < _SHORT:
            parts += (name_length, _U32[value_length], name, value)
        else:
            parts += (_FIELD.pack(len(name), value_length), name, value)
        count += 1
    parts[0] = _HEAD.pack(_RESPONSE, status, count)
    parts += chunks
    return b"".join(parts)


# What encode_app_response does with a header, by its name as the app spelled it: store it as it is (_KEEP), or as
# one of the others says; with the name's length as _FIELD packs it, and the name lower-cased.
_KEEP, _SET_COOKIE, _CONTENT_LENGTH, _CONNECTION, _HOP_BY_HOP = range(5)
_NAMES: dict[bytes, tuple[int, bytes, bytes]] = {}
_NAMES_MAX = 1024
_SHORT = 1024
_U32 = [length.to_bytes(4, "big") for length in range(_SHORT)]  # a value's length as _FIELD packs it


def _name(raw_name: bytes) -> tuple[int, bytes, bytes]:
    """What encode_app_response does with a header named *raw_name* (remembered, for the most common names)."""
    name = raw_name.lower()
    if name == b"set-cookie":
        kind = _SET_COOKIE
    elif name == b"content-length":
        kind = _CONTENT_LENGTH
    elif name == b"connection":
        kind = _CONNECTION
    elif name in HOP_BY_HOP_HEADERS:
        kind = _HOP_BY_HOP
    else:
        kind = _KEEP
    known = (kind, _FIELD.pack(len(name), 0)[:2], name)
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[raw_name] = known
    return known


def _check_length(headers: Iterable[tuple[bytes, bytes]], size: int | None, head: bool) -> None:
    if size is None or head:
        return
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip() != str(size).encode():
            msg = f"Content-Length {value!r} is not the body's {size} bytes"
            raise UnsendableResponse(msg)


def encode_too_large(status: int) -> bytes:
    """Encode the marker of a response that was too large to store."""
    return encode_not_stored(status, "too_large")


def encode_not_stored(status: int, reason: NotStoredReason) -> bytes:
    """Encode the marker of an operation that completed with *status* but whose response was not kept. A few
    bytes, so that it fits where the response did not."""
    return _NOT_STORED_MARKER.pack(_NOT_STORED, status, NOT_STORED_REASONS.index(reason))


def encode_outcome_unknown(status: int = 0) -> bytes:
    """Encode the marker of an operation whose outcome is unknown; *status* is what the first client got."""
    return _MARKER.pack(_UNKNOWN, status)


def encode_value(data: bytes) -> bytes:
    """Frame a decorated function's serialised result for the store."""
    return b"\x04" + data


def decode_value(payload: bytes) -> bytes | TooLargeMarker | OutcomeUnknownMarker:
    """The serialised result :func:`encode_value` framed, or the marker stored in its place.

    Raises:
        ValueError: the payload is not one of ours.
    """
    if payload[:1] == b"\x04":
        return payload[1:]
    marker = decode_marker(payload)
    if marker is None:
        msg = f"unknown stored result format {payload[:1]!r}"
        raise ValueError(msg)
    return marker


def decode_marker(payload: bytes) -> TooLargeMarker | OutcomeUnknownMarker | None:
    """The marker *payload* is, or ``None`` if it is not a marker (a response, a result).

    Raises:
        ValueError: it starts as a marker but is not a well-formed one (a corrupt record).
    """
    version = payload[:1]
    if version == b"\x02":
        if len(payload) == _MARKER.size:
            return TooLargeMarker(_MARKER.unpack(payload)[1])
        if len(payload) == _NOT_STORED_MARKER.size and payload[3] < len(NOT_STORED_REASONS):
            _, status, reason = _NOT_STORED_MARKER.unpack(payload)
            return TooLargeMarker(status, NOT_STORED_REASONS[reason])
    elif version == b"\x03":
        if len(payload) == _MARKER.size:
            return OutcomeUnknownMarker(_MARKER.unpack(payload)[1])
    else:
        return None
    msg = f"malformed marker in a stored response: {payload[:8]!r}"
    raise ValueError(msg)


def decode_response(payload: bytes) -> StoredResponse | TooLargeMarker | OutcomeUnknownMarker:
    """Decode what :func:`encode_response` or :func:`encode_too_large` made.

    Raises:
        ValueError: the payload is not one of ours (a corrupt record, or one written by a newer version).
    """
    decoded = decode_parts(payload)
    if not isinstance(decoded, tuple):
        return decoded
    status, headers, body = decoded
    return StoredResponse(status, tuple(headers), body)


def decode_parts(
    payload: bytes,
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | TooLargeMarker | OutcomeUnknownMarker:
    """:func:`decode_response` without building a :class:`StoredResponse`: ``(status, headers, body)`` (a new
    list of headers, the caller's to extend), or the marker. The middleware's way to replay.

    Raises:
        ValueError: the payload is not one of ours (a corrupt record, or one written by a newer version).
    """
    try:
        version, status, count = _unpack_head(payload)
        if version == _RESPONSE:
            offset = 5  # _HEAD.size
            headers: list[tuple[bytes, bytes]] = []
            while count:
                name_length, value_length = _unpack_field(payload, offset)
                start = offset + 6  # _FIELD.size
                middle = start + name_length
                offset = middle + value_length
                headers.append((payload[start:middle], payload[middle:offset]))
                count -= 1
            if offset <= len(payload):
                return status, headers, payload[offset:]
            msg = "truncated stored response"
            raise ValueError(msg)
    except struct.error as exc:  # a fixed-size field runs past the end (or a marker: shorter than a response's head)
        if payload[:1] == b"\x01":
            msg = f"truncated stored response: {exc}"
            raise ValueError(msg) from exc
    marker = decode_marker(payload)
    if marker is not None:
        return marker
    msg = f"unknown stored response format {payload[:1]!r}"
    raise ValueError(msg)


_unpack_head = _HEAD.unpack_from
_unpack_field = _FIELD.unpack_from
