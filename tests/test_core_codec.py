"""The stored form of a response: encode/decode round trips, the too-large marker, replayable headers."""

from __future__ import annotations

import pytest

from idempo._core import codec
from idempo._core.codec import (
    HOP_BY_HOP_HEADERS,
    StoredResponse,
    TooLargeMarker,
    UnsendableResponse,
    decode_response,
    encode_app_response,
    encode_response,
    encode_too_large,
    storable_headers,
)

Headers = tuple[tuple[bytes, bytes], ...]


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        pytest.param(200, (), b"", id="empty"),
        pytest.param(204, ((b"x-request-id", b"42"),), b"", id="no body"),
        pytest.param(201, ((b"content-type", b"application/json"),), b'{"id":"ch_1"}', id="json"),
        pytest.param(200, ((b"content-type", b"application/octet-stream"),), bytes(range(256)) * 4, id="binary"),
        pytest.param(200, (), b"\x01\x00\x00\x00\x00", id="body that looks like a header"),
        pytest.param(200, tuple((f"x-h{i}".encode(), str(i).encode()) for i in range(500)), b"ok", id="500 headers"),
        pytest.param(200, ((b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")), b"", id="repeated header"),
        pytest.param(200, ((b"x-empty", b""),), b"body", id="empty header value"),
        pytest.param(200, ((b"x-big", b"v" * 70_000),), b"body", id="header value over 64 KiB"),
        pytest.param(200, ((b"x-latin", "café".encode("latin-1")),), b"", id="non-ASCII header value"),
        pytest.param(302, ((b"location", b"/elsewhere"),), b"", id="redirect"),
        pytest.param(599, (), b"x", id="highest status"),
        pytest.param(200, (), b"x" * 3_000_000, id="3 MB body"),
    ],
)
def test_round_trip(status: int, headers: Headers, body: bytes) -> None:
    assert decode_response(encode_response(status, headers, body)) == StoredResponse(status, headers, body)


@pytest.mark.parametrize("status", [200, 201, 404, 599])
def test_too_large_marker_round_trip(status: int) -> None:
    assert decode_response(encode_too_large(status)) == TooLargeMarker(status)


def test_body_is_appended_unencoded() -> None:
    body = b"x" * 1000
    payload = encode_response(200, ((b"a", b"b"),), body)
    assert payload.endswith(body)
    assert len(payload) == 5 + 6 + 2 + len(body)  # version, status, count | name len, value len | "ab" | body


_VALID = encode_response(200, ((b"content-type", b"text/plain"), (b"x-a", b"b")), b"body")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="version 0"),
        pytest.param(b"\x07\x00\xc8\x00\x00", id="unknown version"),
        pytest.param(b"\x03\x00\xc8\x00\x00", id="malformed outcome-unknown marker"),
        pytest.param(b'{"status": 200}', id="json"),
        pytest.param(b"\x01", id="version only"),
        pytest.param(b"\x01\x00\xc8\x00", id="truncated head"),
        pytest.param(b"\x02", id="truncated marker"),
        pytest.param(b"\x02\x00", id="half a marker status"),
        pytest.param(b"\x01\x00\xc8\x00\x01", id="header count but no header"),
        pytest.param(b"\x01\x00\xc8\x00\x01\x00\x01", id="truncated header lengths"),
        pytest.param(b"\x01\x00\xc8\x00\x01\x00\x05\x00\x00\x00\x01abc", id="truncated header name"),
        pytest.param(_VALID[:12], id="cut in the first header"),
        pytest.param(_VALID[:-8], id="cut in the last header"),
        pytest.param(b"\x01\x00\xc8\xff\xff", id="65535 headers announced, none there"),
    ],
)
def test_decode_garbage_raises_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError, match="stored response"):
        decode_response(payload)


def test_storable_headers_drops_every_hop_by_hop_header() -> None:
    headers = [(name, b"x") for name in sorted(HOP_BY_HOP_HEADERS)] + [(b"content-type", b"text/plain")]
    assert storable_headers(headers) == ((b"content-type", b"text/plain"),)


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        pytest.param([], (), id="none"),
        pytest.param([(b"Content-Type", b"text/html")], ((b"content-type", b"text/html"),), id="names lower-cased"),
        pytest.param(
            [(b"Transfer-Encoding", b"chunked"), (b"KEEP-ALIVE", b"timeout=5"), (b"etag", b'"1"')],
            ((b"etag", b'"1"'),),
            id="hop-by-hop whatever the case",
        ),
        pytest.param(
            [(b"connection", b"X-Internal , x-trace"), (b"x-internal", b"1"), (b"X-Trace", b"2"), (b"x-kept", b"3")],
            ((b"x-kept", b"3"),),
            id="headers named in Connection",
        ),
        pytest.param(
            [(b"x-internal", b"1"), (b"connection", b"x-internal")],
            (),
            id="named in a later Connection",
        ),
        pytest.param(
            [(b"set-cookie", b"session=1"), (b"Set-Cookie", b"theme=dark"), (b"vary", b"accept")],
            ((b"vary", b"accept"),),
            id="set-cookie dropped",
        ),
        pytest.param(
            [(b"x-b", b"1"), (b"x-a", b"2"), (b"x-b", b"3")],
            ((b"x-b", b"1"), (b"x-a", b"2"), (b"x-b", b"3")),
            id="order and repeats kept",
        ),
    ],
)
def test_storable_headers(headers: list[tuple[bytes, bytes]], kept: Headers) -> None:
    assert storable_headers(headers) == kept


def test_storable_headers_keeps_set_cookie_when_asked() -> None:
    headers = [(b"Set-Cookie", b"session=1"), (b"connection", b"close"), (b"set-cookie", b"theme=dark")]
    assert storable_headers(headers, keep_set_cookie=True) == (
        (b"set-cookie", b"session=1"),
        (b"set-cookie", b"theme=dark"),
    )


# -- encode_app_response: the middleware's one pass over an app's headers -------------------------------------------

_APP_HEADERS = [
    pytest.param([(b"content-type", b"application/json"), (b"content-length", b"4")], id="as FastAPI sends them"),
    pytest.param([(b"Content-Type", b"text/plain"), (b"X-Trace", b"t" * 2000)], id="mixed case, a long value"),
    pytest.param([(b"content-length", b" 4 "), (b"etag", b'"x"')], id="a Content-Length with spaces"),
    pytest.param([(b"set-cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"vary", b"accept")], id="cookies"),
    pytest.param([(b"keep-alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"), (b"x-a", b"1")], id="hop-by-hop"),
    pytest.param([(b"x-a", b"1"), (b"Connection", b"x-a, close"), (b"x-b", b"2")], id="Connection names more"),
]


@pytest.mark.parametrize("keep_set_cookie", [False, True])
@pytest.mark.parametrize("headers", _APP_HEADERS)
def test_encode_app_response_is_encode_response_of_the_storable_headers(
    headers: list[tuple[bytes, bytes]], keep_set_cookie: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the header names are remembered (the second call), new, or no longer remembered (a full table)."""
    expected = encode_response(200, storable_headers(headers, keep_set_cookie=keep_set_cookie), b"done")
    for _ in range(2):
        assert encode_app_response(200, headers, [b"do", b"ne"], keep_set_cookie=keep_set_cookie, size=4) == expected
    monkeypatch.setattr(codec, "_NAMES", {})
    monkeypatch.setattr(codec, "_NAMES_MAX", 0)
    assert encode_app_response(200, headers, [b"do", b"ne"], keep_set_cookie=keep_set_cookie, size=4) == expected
    assert codec._NAMES == {}


def test_encode_app_response_refuses_a_wrong_content_length() -> None:
    with pytest.raises(UnsendableResponse, match="is not the body's 4 bytes"):
        encode_app_response(200, [(b"Content-Length", b"5")], [b"done"], size=4)
    assert encode_app_response(200, [(b"Content-Length", b"5")], [b"done"], size=4, head=True)
    assert encode_app_response(200, [(b"Content-Length", b"5")], [b"done"])  # no size: not checked
