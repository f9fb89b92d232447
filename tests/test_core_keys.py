"""parse_key: the Idempotency-Key header value, bare or as a Structured-Field string."""

from __future__ import annotations

import pytest

from idempo import InvalidKeyError
from idempo._core.keys import parse_key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param(b"abc", "abc", id="bare token"),
        pytest.param(b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324", id="uuid"),
        pytest.param(b"!", "!", id="lowest visible character"),
        pytest.param(b"~", "~", id="highest visible character"),
        pytest.param(bytes(range(0x21, 0x7F)), bytes(range(0x21, 0x7F)).decode(), id="every visible character"),
        pytest.param(b'a"b', 'a"b', id="quote inside a bare token"),
        pytest.param(b'abc"', 'abc"', id="bare token ending in a quote"),
        pytest.param(b'"abc"', "abc", id="sf-string"),
        pytest.param(b'"a\\"b"', 'a"b', id="sf-string escaped quote"),
        pytest.param(b'"a\\\\b"', "a\\b", id="sf-string escaped backslash"),
        pytest.param(b'"\\\\\\""', '\\"', id="sf-string two escapes"),
        pytest.param(b"  abc\t", "abc", id="surrounding whitespace stripped"),
        pytest.param(b' \t"abc" ', "abc", id="whitespace around an sf-string"),
        pytest.param(b"a" * 255, "a" * 255, id="255 characters"),
        pytest.param(b'"' + b"a" * 255 + b'"', "a" * 255, id="255 characters quoted"),
        pytest.param(b'"\\"' + b"a" * 254 + b'"', '"' + "a" * 254, id="255 characters once unescaped"),
    ],
)
def test_valid_keys(raw: bytes, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"   ", "empty", id="spaces only"),
        pytest.param(b" \t ", "empty", id="whitespace only"),
        pytest.param(b'""', "empty", id="empty sf-string"),
        pytest.param(b"a" * 256, "256 characters long; at most 255", id="256 characters"),
        pytest.param(b'"' + b"a" * 256 + b'"', "256 characters long", id="256 characters quoted"),
        pytest.param(b"a b", "visible ASCII", id="space inside"),
        pytest.param(b'"a b"', "visible ASCII", id="space inside an sf-string"),
        pytest.param(b"a\x00b", "visible ASCII", id="NUL"),
        pytest.param(b"a\x1b[31mb", "visible ASCII", id="escape sequence"),
        pytest.param(b"a\nb", "visible ASCII", id="newline"),
        pytest.param(b"abc\r", "visible ASCII", id="trailing carriage return"),
        pytest.param(b"a\x7fb", "visible ASCII", id="DEL"),
        pytest.param(b"caf\xc3\xa9", "visible ASCII", id="UTF-8"),
        pytest.param(b"\xff\xfe", "visible ASCII", id="not UTF-8"),
        pytest.param(b'"abc', "quoted string", id="unterminated sf-string"),
        pytest.param(b'"', "quoted string", id="lone quote"),
        pytest.param(b'"abc\\"', "quoted string", id="closing quote escaped"),
        pytest.param(b'"a\\b"', "quoted string", id="invalid escape"),
        pytest.param(b'"a"b"', "quoted string", id="unescaped quote inside"),
        pytest.param(b'"a\tb"', "quoted string", id="tab inside an sf-string"),
        pytest.param(b'"caf\xc3\xa9"', "quoted string", id="UTF-8 inside an sf-string"),
    ],
)
def test_invalid_keys(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=message) as raised:
        parse_key(raw)
    assert raised.value.status == 400
    assert raised.value.slug == "invalid-key"
