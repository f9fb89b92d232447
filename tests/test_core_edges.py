"""The core's remaining edges, each a rule of its own: the old three-byte marker, decorated results' framing, a
``Connection`` header beside a wrong length, the fingerprint's head cache, a dependency of an extra that is missing,
closing an outcome report twice, an option that does not exist, a user whose first identity is empty, how often
a lease is renewed."""

from __future__ import annotations

import pytest

from idempo import MissingDependency
from idempo._core import fingerprint as fingerprint_module
from idempo._core.codec import (
    OutcomeUnknownMarker,
    TooLargeMarker,
    UnsendableResponse,
    decode_marker,
    decode_value,
    encode_app_response,
    encode_not_stored,
    encode_outcome_unknown,
    encode_value,
)
from idempo._core.extras import require
from idempo._core.fingerprint import fingerprint_request
from idempo._core.outcome import OutcomeReport, current
from idempo._core.policy import option_doc, renewal_period
from idempo._core.principal import user_principal


def test_a_marker_written_before_it_had_a_reason_is_too_large() -> None:
    assert decode_marker(b"\x02\x00\xc9") == TooLargeMarker(201, "too_large")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(encode_value(b'{"a":1}'), b'{"a":1}', id="a result"),
        pytest.param(encode_value(b""), b"", id="an empty result"),
        pytest.param(encode_not_stored(0, "unserializable"), TooLargeMarker(0, "unserializable"), id="not stored"),
        pytest.param(encode_outcome_unknown(), OutcomeUnknownMarker(0), id="outcome unknown"),
    ],
)
def test_decode_value(payload: bytes, expected: object) -> None:
    assert decode_value(payload) == expected


def test_a_payload_that_is_not_a_result_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown stored result format"):
        decode_value(b'{"not": "framed"}')


def test_a_connection_header_does_not_hide_a_wrong_length() -> None:
    headers = [(b"connection", b"x-custom"), (b"x-custom", b"1"), (b"content-length", b"9")]
    with pytest.raises(UnsendableResponse, match="Content-Length"):
        encode_app_response(200, headers, [b"four"], size=4)
    assert encode_app_response(200, headers, [b"four"], size=4, head=True)  # HEAD: any length
    assert encode_app_response(200, headers, [b"four"])  # no size given: not checked


def test_the_fingerprint_caches_short_heads_and_not_long_ones() -> None:
    heads = fingerprint_module._HEADS
    heads.clear()
    fingerprint_request("POST", "/short", b"", b"")
    assert len(heads) == 1
    fingerprint_request("POST", "/" + "x" * 1024, b"", b"")
    assert len(heads) == 1  # a long path is hashed, not kept
    for n in range(fingerprint_module._HEADS_MAX):
        fingerprint_request("POST", f"/p{n}", b"", b"")
    assert len(heads) <= fingerprint_module._HEADS_MAX  # full: cleared, never grown past its bound
    assert fingerprint_request("POST", "/p1", b"", b"body") == fingerprint_request("POST", "/p1", b"", b"body")


def test_a_missing_extra_names_it_but_a_missing_dependency_of_it_propagates() -> None:
    with pytest.raises(MissingDependency, match=r"pip install 'idempo\[cli\]'"):
        require("idempo_no_such_module", extra="cli")
    with pytest.raises(ModuleNotFoundError) as raised:
        require("json.no_such_submodule", extra="cli")  # json is there: what is missing is not the extra
    assert not isinstance(raised.value, MissingDependency)


def test_closing_an_outcome_report_twice_changes_nothing() -> None:
    before = current.get()
    report = OutcomeReport.open()
    assert current.get() is report
    report.close()
    report.close()
    assert current.get() is before


def test_an_option_that_does_not_exist_has_no_doc() -> None:
    with pytest.raises(KeyError, match="no_such_option"):
        option_doc("no_such_option")


class _UserWithoutId:
    is_authenticated = True
    id = None
    pk = ""
    username = "alice"


def test_a_user_whose_first_identities_are_empty_is_known_by_the_next() -> None:
    assert user_principal(_UserWithoutId()) == b"user:tests.test_core_edges._UserWithoutId:alice"


@pytest.mark.parametrize(("lease", "period"), [(30.0, 10.0), (0.3, 0.1), (3600.0, 1200.0)])
def test_a_lease_is_renewed_three_times_over(lease: float, period: float) -> None:
    assert renewal_period(lease) == pytest.approx(period)
