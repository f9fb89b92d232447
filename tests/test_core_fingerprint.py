"""Fingerprints (what is asked) and principal digests (who asks)."""

from __future__ import annotations

import re

import pytest

from idempo import canonical_json_body, fingerprint_request
from idempo._core.fingerprint import principal_digest, scoped_key

Request = tuple[str, str, bytes, bytes]
BASE: Request = ("POST", "/charges", b"currency=eur", b'{"amount": 100}')


def test_fingerprint_is_a_stable_sha256_hex_digest() -> None:
    digest = fingerprint_request(*BASE)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert fingerprint_request(*BASE) == digest


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(("PUT", *BASE[1:]), id="method"),
        pytest.param(("post", *BASE[1:]), id="method case"),
        pytest.param((BASE[0], "/charges/", *BASE[2:]), id="path"),
        pytest.param((BASE[0], "/Charges", *BASE[2:]), id="path case"),
        pytest.param((*BASE[:2], b"currency=usd", BASE[3]), id="query"),
        pytest.param((*BASE[:2], b"", BASE[3]), id="no query"),
        pytest.param((*BASE[:3], b'{"amount": 101}'), id="body"),
        pytest.param((*BASE[:3], b'{"amount":100}'), id="body whitespace"),
        pytest.param((*BASE[:3], b""), id="no body"),
    ],
)
def test_fingerprint_differs_when_one_part_differs(other: Request) -> None:
    assert fingerprint_request(*other) != fingerprint_request(*BASE)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(("POST", "/a", b"b=1", b""), ("POST", "/ab", b"=1", b""), id="path and query"),
        pytest.param(("POST", "/a", b"", b"b=1"), ("POST", "/ab", b"", b"=1"), id="path and body"),
        pytest.param(("POST", "/a", b"x", b"y"), ("POST", "/a", b"xy", b""), id="query and body"),
        pytest.param(("POST", "/a", b"", b"xy"), ("POST", "/a", b"x", b"y"), id="body and query"),
        pytest.param(("POS", "T/a", b"", b""), ("POST", "/a", b"", b""), id="method and path"),
    ],
)
def test_fingerprint_parts_are_length_prefixed(first: Request, second: Request) -> None:
    assert first[0] + first[1] + first[2].decode() + first[3].decode() == (
        second[0] + second[1] + second[2].decode() + second[3].decode()
    )
    assert fingerprint_request(*first) != fingerprint_request(*second)


def test_fingerprint_accepts_any_path() -> None:
    assert fingerprint_request("POST", "/café", b"", b"") != fingerprint_request("POST", "/cafe", b"", b"")
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint_request("POST", "/\udcff", b"", b""))  # undecodable raw path


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(b'{"a": 1, "b": 2}', b'{"b":2,"a":1}', id="key order and whitespace"),
        pytest.param(
            b'{"a": {"y": [1, 2], "x": null}}', b'\n{ "a" : { "x" : null , "y" : [ 1 , 2 ] } }\n', id="nested"
        ),
        pytest.param(b'{"name": "caf\\u00e9"}', '{"name": "café"}'.encode(), id="unicode escapes"),
        pytest.param(b"[1, 2, 3]", b"[1,2,3]", id="array"),
    ],
)
def test_canonical_json_equal_documents(first: bytes, second: bytes) -> None:
    assert canonical_json_body(first) == canonical_json_body(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(b'{"a": 1}', b'{"a": 2}', id="value"),
        pytest.param(b"[1, 2]", b"[2, 1]", id="array order"),
        pytest.param(b'{"a": 1}', b'{"A": 1}', id="key case"),
    ],
)
def test_canonical_json_different_documents(first: bytes, second: bytes) -> None:
    assert canonical_json_body(first) != canonical_json_body(second)


def test_canonical_json_form() -> None:
    assert (
        canonical_json_body(b'{ "b": [1, {"d": 4, "c": 3}], "a": "\\u00e9" }')
        == '{"a":"é","b":[1,{"c":3,"d":4}]}'.encode()
    )


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"amount=100&currency=eur", id="form"),
        pytest.param(b'{"amount": 100', id="broken json"),
        pytest.param(b"\xff\xfe\x00", id="not UTF-8"),
        pytest.param(b"<xml/>", id="xml"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested too deep"),
    ],
)
def test_canonical_json_leaves_other_bodies_unchanged(body: bytes) -> None:
    assert canonical_json_body(body) == body


def test_principal_digest() -> None:
    digest = principal_digest("Bearer sk_test_123")
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    assert principal_digest("Bearer sk_test_123") == digest
    assert principal_digest(b"Bearer sk_test_123") == digest
    assert principal_digest("Bearer sk_test_124") != digest
    assert "sk_test" not in digest
    assert len(principal_digest(b"")) == 32
    assert len(principal_digest("x" * 100_000)) == 32


def test_scoped_key() -> None:
    assert scoped_key(principal_digest(b""), "k:1") == principal_digest(b"") + ":k:1"


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        pytest.param(b"application/json", b"application/json; charset=utf-8", True, id="parameters do not count"),
        pytest.param(b"application/json", b"Application/JSON", True, id="case does not count"),
        pytest.param(b"application/json", b" application/json ", True, id="spaces do not count"),
        pytest.param(b"application/json", b"application/x-www-form-urlencoded", False, id="another media type"),
        pytest.param(b"application/json", b"", False, id="none"),
        pytest.param(b"text/plain", b"text/plain;a=1", True, id="parameter without space"),
    ],
)
def test_the_media_type_counts_and_its_parameters_do_not(first: bytes, second: bytes, same: bool) -> None:
    one = fingerprint_request(*BASE, first)
    other = fingerprint_request(*BASE, second)
    assert (one == other) is same


def test_the_media_type_is_length_prefixed_too() -> None:
    assert fingerprint_request("POST", "/a", b"", b"xy", b"") != fingerprint_request("POST", "/a", b"", b"y", b"x")


def test_canonical_json_stops_at_its_bound() -> None:
    document = b'{"b": 1, "a": 2}'
    assert canonical_json_body(document) == b'{"a":2,"b":1}'
    assert canonical_json_body(document, max_bytes=len(document) - 1) == document
