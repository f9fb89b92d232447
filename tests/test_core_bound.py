"""idempo._core.bound: a keyed request's claim as the transaction bindings see it, by tables. No database here: the
statements run against real databases in tests/test_transactions_*.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from idempo import Policy
from idempo._core.bound import (
    COMMITTED,
    OPEN,
    RECORDED,
    Bound,
    Target,
    current,
    pyformat,
    response_parts,
    same_host,
)
from idempo._core.codec import decode_parts
from idempo._core.errors import KeyTakenOverError, NotClaimedError, WrongDatabaseError
from idempo._core.outcome import OutcomeReport

PG = Target("postgresql", ("127.0.0.1", "5432", "shop"), "UPDATE t SET x = :payload", lambda: None, "PG")
SQLITE = Target("sqlite", ("/srv/shop.db",), "UPDATE t SET x = :payload", lambda: 1000.0, "SQLite")


def bound(target: Target | None = PG, **policy: Any) -> Bound:
    return Bound(Policy(**policy), "the store", target, "scoped:key", "tok", head=False)


@pytest.fixture
def report() -> Iterator[OutcomeReport]:
    opened = OutcomeReport.open()
    yield opened
    opened.close()


# -- which database ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("db.internal", "db.internal", True),
        ("127.0.0.1", "localhost", True),
        ("localhost", "::1", True),
        ("", "/var/run/postgresql", True),  # the default is the Unix socket
        ("/tmp", "127.0.0.1", True),
        ("db.internal", "localhost", False),
        ("db1", "db2", False),
    ],
)
def test_same_host(a: str, b: str, same: bool) -> None:
    assert same_host(a, b) is same
    assert same_host(b, a) is same


@pytest.mark.parametrize(
    ("target", "dialect", "identity", "accepted"),
    [
        (PG, "postgresql", ("localhost", "5432", "shop"), True),
        (PG, "postgresql", ("", "5432", "shop"), True),
        (PG, "postgresql", ("127.0.0.1", "5433", "shop"), False),
        (PG, "postgresql", ("127.0.0.1", "5432", "other"), False),
        (PG, "postgresql", ("elsewhere", "5432", "shop"), False),
        (PG, "postgresql", ("127.0.0.1",), False),
        (PG, "sqlite", ("/srv/shop.db",), False),
        (SQLITE, "sqlite", ("/srv/shop.db",), True),
        (SQLITE, "sqlite", ("/srv/other.db",), False),
        (SQLITE, "postgresql", ("127.0.0.1", "5432", "shop"), False),
    ],
)
def test_require_accepts_only_the_stores_database(
    target: Target, dialect: str, identity: tuple[str, ...], accepted: bool
) -> None:
    claim = bound(target)
    if accepted:
        assert claim.require(dialect, identity) is target
    else:
        with pytest.raises(WrongDatabaseError, match="point the store at the application's database"):
            claim.require(dialect, identity)


def test_a_store_that_is_not_sql_cannot_take_part() -> None:
    with pytest.raises(WrongDatabaseError, match="cannot record a response in a transaction"):
        bound(None).require("sqlite", ("/srv/shop.db",))


def test_the_error_names_both_databases() -> None:
    with pytest.raises(WrongDatabaseError) as raised:
        bound(PG).require("postgresql", ("", "5432", "other"))
    assert "'other' on localhost:5432" in str(raised.value)
    assert "'shop' on 127.0.0.1:5432" in str(raised.value)


# -- the completion ----------------------------------------------------------------------------------------------------


def test_a_kept_response_is_the_stores_completion_with_its_parameters(report: OutcomeReport) -> None:
    claim = bound(SQLITE)
    completion = claim.completion(SQLITE, 201, [(b"content-type", b"application/json")], b'{"id": 1}')
    assert completion is not None
    statement, params = completion
    assert statement == SQLITE.statement
    assert params["key"] == "scoped:key"
    assert params["token"] == "tok"
    assert params["now"] == 1000.0
    assert params["ttl"] == Policy().ttl
    assert params["payload"] == claim.payload
    decoded = decode_parts(params["payload"])
    assert isinstance(decoded, tuple)
    status, headers, body = decoded
    assert (status, body) == (201, b'{"id": 1}')
    assert (b"content-type", b"application/json") in headers


@pytest.mark.parametrize(
    ("status", "options", "kept"),
    [
        (200, {}, True),
        (422, {}, True),
        (500, {}, False),
        (503, {}, False),
        (500, {"store_server_errors": True}, True),
    ],
)
def test_only_a_response_that_is_kept_is_recorded(status: int, options: dict[str, Any], kept: bool) -> None:
    claim = bound(PG, **options)
    assert (claim.completion(PG, status, [], b"x") is not None) is kept
    assert (claim.payload is not None) is kept


def test_the_server_clock_is_a_null_parameter() -> None:
    completion = bound(PG).completion(PG, 200, [], b"")
    assert completion is not None
    assert completion[1]["now"] is None


def test_an_outcome_the_app_said_is_unknown_is_recorded_as_unknown(report: OutcomeReport) -> None:
    report.mark_unknown()
    claim = bound(PG)
    completion = claim.completion(PG, 200, [], b"done?")
    assert completion is not None
    assert completion[1]["ttl"] == Policy().kept_unknown_for
    assert completion[1]["payload"][:1] != b"\x01"  # a marker, not a response


def test_a_body_over_the_limit_is_recorded_as_not_stored() -> None:
    claim = bound(PG, max_response_bytes=4)
    completion = claim.completion(PG, 200, [], b"12345")
    assert completion is not None
    assert completion[1]["payload"][:1] != b"\x01"


def test_the_states_of_a_claim() -> None:
    claim = bound()
    assert claim.state == OPEN
    claim.committed()  # nothing recorded: nothing committed
    assert claim.state == OPEN
    claim.recorded(1)
    assert claim.state == RECORDED
    claim.rolled_back()
    assert (claim.state, claim.payload) == (OPEN, None)
    claim.rolled_back()
    assert claim.state == OPEN
    claim.recorded(1)
    claim.committed()
    assert claim.state == COMMITTED
    claim.rolled_back()  # too late: it committed
    assert claim.state == COMMITTED
    with pytest.raises(NotClaimedError, match="committed already"):
        claim.completion(PG, 200, [], b"")


@pytest.mark.parametrize("rowcount", [0, 2, -1])
def test_no_row_means_the_key_is_no_longer_this_requests(rowcount: int) -> None:
    claim = bound()
    with pytest.raises(KeyTakenOverError, match="roll the transaction back"):
        claim.recorded(rowcount)
    assert claim.state == OPEN


# -- where the bindings find it --------------------------------------------------------------------------------------


def test_current_is_the_nearest_claim_of_the_running_reports() -> None:
    assert current() is None
    outer = OutcomeReport.open()
    try:
        assert current() is None
        claim = outer.bound = bound()
        assert current() is claim
        inner = OutcomeReport.open()  # a decorated function called by the handler: no claim of its own
        try:
            assert current() is claim
        finally:
            inner.close()
    finally:
        outer.close()
    assert current() is None


class _Claimant:
    """A face's per-request object: makes the Bound when a binding first asks for it."""

    def __init__(self) -> None:
        self.made: list[Bound] = []

    def bind(self) -> Bound:
        self.made.append(bound())
        return self.made[-1]


def _made(report: OutcomeReport) -> Bound | None:
    return report.made


def test_a_claimants_bound_is_made_once_and_only_when_asked_for() -> None:
    claimant = _Claimant()
    report = OutcomeReport.open(claimant)
    try:
        assert claimant.made == []
        assert _made(report) is None  # what the faces read: not made, so OPEN
        claim = current()
        assert claim is not None
        assert claimant.made == [claim]
        assert current() is claim
        assert report.bound is claim
        assert _made(report) is claim
        assert claimant.made == [claim]
    finally:
        report.close()
    assert current() is None


def test_a_bound_set_on_the_report_wins_over_its_claimant() -> None:
    claimant = _Claimant()
    report = OutcomeReport.open(claimant)
    try:
        claim = report.bound = bound()
        assert current() is claim
        assert claimant.made == []
    finally:
        report.close()


# -- the statement in each driver's style ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("named", "expected"),
    [
        ("SET a = :payload WHERE key = :key", "SET a = %(payload)s WHERE key = %(key)s"),
        ("SELECT x::float8, CAST(:now AS float8)", "SELECT x::float8, CAST(%(now)s AS float8)"),
        ("now.t + :ttl", "now.t + %(ttl)s"),
    ],
)
def test_pyformat(named: str, expected: str) -> None:
    assert pyformat(named) == expected


# -- a framework's response -------------------------------------------------------------------------------------------


class _Headers:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def items(self) -> list[tuple[str, str]]:
        return self._items


class _Flask:
    status_code = 201
    is_streamed = False
    headers = _Headers([("Content-Type", "text/plain")])

    def get_data(self) -> bytes:
        return b"flask"


class _Django:
    status_code = 202
    streaming = False
    content = b"django"

    def items(self) -> list[tuple[str, str]]:
        return [("Content-Type", "text/html")]


class _Starlette:
    status_code = 200
    raw_headers = ((b"content-type", b"application/json"),)
    body = b"{}"


class _Streaming:
    status_code = 200
    streaming = True


class _NoBody:
    status_code = 200


@pytest.mark.parametrize(
    ("response", "parts"),
    [
        ((201, [("X-A", "1")], b"t"), (201, [(b"x-a", b"1")], b"t")),
        ((200, {"X-B": "2"}, bytearray(b"m")), (200, [(b"x-b", b"2")], b"m")),
        ((204, [(b"X-C", b"3")], b""), (204, [(b"x-c", b"3")], b"")),
        (_Flask(), (201, [(b"content-type", b"text/plain")], b"flask")),
        (_Django(), (202, [(b"content-type", b"text/html")], b"django")),
        (_Starlette(), (200, [(b"content-type", b"application/json")], b"{}")),
    ],
)
def test_response_parts(response: object, parts: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    assert response_parts(response) == parts


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (_Streaming(), "streaming response cannot be recorded"),
        (_NoBody(), "body is not known before it is sent"),
        ("a string", "give a response object or"),
    ],
)
def test_a_response_without_a_known_body_cannot_be_recorded(response: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        response_parts(response)


def test_the_frameworks_own_responses() -> None:
    from flask import Response as FlaskResponse
    from starlette.responses import JSONResponse, StreamingResponse

    from tests.support import django_setup

    django_setup.setup()  # the test project's settings, once per process
    from django.http import HttpResponse, StreamingHttpResponse

    assert response_parts(JSONResponse({"a": 1}, status_code=201))[::2] == (201, b'{"a":1}')
    assert response_parts(HttpResponse(b"hi", status=202))[::2] == (202, b"hi")
    with_cookie = HttpResponse(b"hi")
    with_cookie.set_cookie("session", "s1", httponly=True)
    assert (b"set-cookie", b"session=s1; HttpOnly; Path=/") in response_parts(with_cookie)[1]
    assert response_parts(FlaskResponse(b"yo", status=203))[::2] == (203, b"yo")

    def chunks() -> Iterator[bytes]:
        yield b"x"

    for streaming in (StreamingHttpResponse(chunks()), FlaskResponse(chunks())):
        with pytest.raises(TypeError, match="streaming"):
            response_parts(streaming)
    with pytest.raises(TypeError, match="not known before it is sent"):
        response_parts(StreamingResponse(chunks()))
