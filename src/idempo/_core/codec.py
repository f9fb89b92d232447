"""The stored form of an HTTP response, and its byte encoding.

Stores keep payloads as opaque bytes. A response is encoded as a version byte, a small fixed header and the
body appended as it is, so that a multi-megabyte body is never re-encoded (no base64, no JSON escaping)::

    b"\\x01" | status u16 | header count u16 | (name length u16 | value length u32 | name | value)* | body

A response that was too large to keep is recorded as a marker, so that the operation is never run twice::

    b"\\x02" | status u16
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "StoredResponse",
    "TooLargeMarker",
    "decode_parts",
    "decode_response",
    "encode_app_response",
    "encode_response",
    "encode_too_large",
    "storable_headers",
]

_RESPONSE = 1
_TOO_LARGE = 2
_HEAD = struct.Struct(">BHH")
_FIELD = struct.Struct(">HI")
_MARKER = struct.Struct(">BH")

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


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as it is replayed: status, headers (lower-case names, raw bytes) and the whole body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class TooLargeMarker:
    """The operation completed with *status*, but its response was over ``max_response_bytes``."""

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


def encode_app_response(
    status: int, headers: Iterable[tuple[bytes, bytes]], chunks: Iterable[bytes], *, keep_set_cookie: bool = False
) -> bytes:
    """``encode_response(status, storable_headers(headers, keep_set_cookie=...), b"".join(chunks))`` in one pass
    over the headers and one copy of the body: the middleware's way to encode what an app answered."""
    dropped = _DROPPED_KEEPING_COOKIES if keep_set_cookie else _DROPPED
    pack = _FIELD.pack
    parts = [b""]
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in dropped:
            if name == b"connection":  # it may name more headers to drop, even ones already encoded
                stored = storable_headers(headers, keep_set_cookie=keep_set_cookie)
                return encode_response(status, stored, b"".join(chunks))
            continue
        parts += (pack(len(name), len(value)), name, value)
    parts[0] = _HEAD.pack(_RESPONSE, status, len(parts) // 3)
    parts += chunks
    return b"".join(parts)


def encode_too_large(status: int) -> bytes:
    """Encode the marker of a response that was too large to store."""
    return _MARKER.pack(_TOO_LARGE, status)


def decode_response(payload: bytes) -> StoredResponse | TooLargeMarker:
    """Decode what :func:`encode_response` or :func:`encode_too_large` made.

    Raises:
        ValueError: the payload is not one of ours (a corrupt record, or one written by a newer version).
    """
    decoded = decode_parts(payload)
    if isinstance(decoded, TooLargeMarker):
        return decoded
    status, headers, body = decoded
    return StoredResponse(status, tuple(headers), body)


def decode_parts(payload: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes] | TooLargeMarker:
    """:func:`decode_response` without building a :class:`StoredResponse`: ``(status, headers, body)`` (a new
    list of headers, the caller's to extend), or the marker. The middleware's way to replay."""
    try:
        return _decode(payload)
    except struct.error as exc:  # a fixed-size field runs past the end: not a ValueError of its own
        msg = f"truncated stored response: {exc}"
        raise ValueError(msg) from exc


def _decode(payload: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes] | TooLargeMarker:
    version = payload[:1]
    if version == b"\x02":
        _, status = _MARKER.unpack_from(payload)
        return TooLargeMarker(status)
    if version != b"\x01":
        msg = f"unknown stored response format {version!r}"
        raise ValueError(msg)
    _, status, count = _HEAD.unpack_from(payload)
    offset = _HEAD.size
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        name_len, value_len = _FIELD.unpack_from(payload, offset)
        offset += _FIELD.size
        name = payload[offset : offset + name_len]
        offset += name_len
        value = payload[offset : offset + value_len]
        offset += value_len
        headers.append((name, value))
    if offset > len(payload):
        msg = "truncated stored response"
        raise ValueError(msg)
    return status, headers, payload[offset:]
