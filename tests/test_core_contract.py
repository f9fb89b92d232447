"""The rest of the decision table (``idempo._core.decide``), row by row, as tables: admission, the wait, a store
that fails, what an outcome is recorded as, replays; the policy's defaults and checks; and the README's contract
table, which must be the table's own rendering."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from idempo import (
    BodyTooLargeError,
    ConfigurationError,
    InvalidKeyError,
    MissingKeyError,
    OutcomeUnknownError,
    ResponseNotStoredError,
)
from idempo._core.codec import (
    OutcomeUnknownMarker,
    StoredResponse,
    TooLargeMarker,
    decode_response,
    encode_not_stored,
    encode_outcome_unknown,
    encode_response,
)
from idempo._core.decide import (
    ROWS,
    WAIT_FIRST,
    WAIT_MAX,
    Conflict,
    FailOpen,
    Mismatch,
    Passthrough,
    Refuse,
    Unavailable,
    Wait,
    admit,
    body_too_large,
    decide_cached,
    on_store_failure,
    record_for,
    record_response,
    render_rows,
    replay,
    wait_or_answer,
)
from idempo._core.policy import DEFAULT_METHODS, Policy, PolicyOptions, option_doc

README = Path(__file__).resolve().parents[1] / "README.md"
POLICY = Policy()


# -- admission ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "require_key", "path", "expected"),
    [
        pytest.param([], False, "/x", Passthrough(), id="no key: passes through"),
        pytest.param([], True, "/x", MissingKeyError, id="no key where required: 400 missing-key"),
        pytest.param([], lambda path: path.startswith("/pay"), "/pay/1", MissingKeyError, id="required by predicate"),
        pytest.param([], lambda path: path.startswith("/pay"), "/other", Passthrough(), id="not required there"),
        pytest.param([b"abc"], False, "/x", "abc", id="one key: admitted, its key"),
        pytest.param([b'"abc"'], False, "/x", "abc", id="a quoted key is its content"),
        pytest.param([b"a", b"a"], False, "/x", InvalidKeyError, id="two keys: 400 invalid-key"),
        pytest.param([b""], False, "/x", InvalidKeyError, id="empty: 400"),
        pytest.param([b"has space"], False, "/x", InvalidKeyError, id="not visible ASCII: 400"),
        pytest.param([b"k" * 256], False, "/x", InvalidKeyError, id="over 255 characters: 400"),
    ],
)
def test_admit(keys: list[bytes], require_key: Any, path: str, expected: object) -> None:
    answer = admit(Policy(require_key=require_key), keys, path)
    if isinstance(expected, type):
        assert isinstance(answer, Refuse)
        assert type(answer.error) is expected
    else:
        assert answer == expected


@pytest.mark.parametrize(
    ("size", "declared", "expected"),
    [
        pytest.param(100, False, None, id="at the limit"),
        pytest.param(101, False, "the request body is over 100 bytes, the most accepted", id="read over it"),
        pytest.param(101, True, "the request body is 101 bytes; at most 100 are accepted", id="declared over it"),
    ],
)
def test_body_too_large(size: int, declared: bool, expected: str | None) -> None:
    error = body_too_large(Policy(max_request_bytes=100), size, declared=declared)
    if expected is None:
        assert error is None
    else:
        assert isinstance(error, BodyTooLargeError)
        assert (error.status, str(error)) == (413, expected)


# -- the wait, a store that fails ---------------------------------------------------------------------------------


def test_reject_answers_the_409_at_once() -> None:
    conflict = Conflict(3)
    assert wait_or_answer(POLICY, conflict, waited=0, delay=0) is conflict


def test_the_wait_doubles_its_pauses_up_to_its_bound_and_ends_with_the_409() -> None:
    policy = Policy(on_conflict="wait", wait_timeout=2.0)
    conflict = Conflict(1)
    pauses: list[float] = []
    waited, delay = 0.0, 0.0
    while True:
        step = wait_or_answer(policy, conflict, waited=waited, delay=delay)
        if not isinstance(step, Wait):
            break
        pauses.append(step.seconds)
        waited += step.seconds
        delay = step.seconds
    assert step is conflict
    assert pauses[:3] == [WAIT_FIRST, WAIT_FIRST * 2, WAIT_FIRST * 4]
    assert max(pauses) == WAIT_MAX
    assert sum(pauses) <= policy.wait_timeout
    assert sum(pauses) + WAIT_MAX > policy.wait_timeout  # it waited as long as it could


def test_a_wait_timeout_of_zero_never_waits() -> None:
    conflict = Conflict(1)
    assert wait_or_answer(Policy(on_conflict="wait", wait_timeout=0), conflict, waited=0, delay=0) is conflict


@pytest.mark.parametrize(
    ("on_store_error", "expected"),
    [("fail_closed", Unavailable(7)), ("fail_open", FailOpen())],
)
def test_on_store_failure(on_store_error: Any, expected: object) -> None:
    assert on_store_failure(Policy(on_store_error=on_store_error, retry_after=7)) == expected


def test_the_503_of_a_failed_store_is_a_problem_document() -> None:
    problem = Unavailable(7).problem("urn:x:")
    assert (problem.status, problem.type) == (503, "urn:x:store-unavailable")


def test_decide_cached() -> None:
    assert decide_cached("fp", b"payload", "fp") == b"payload"
    assert decide_cached("fp", b"payload", "other") == Mismatch()


# -- what an outcome is recorded as --------------------------------------------------------------------------------

_HEADERS = [(b"content-type", b"text/plain"), (b"set-cookie", b"s=1"), (b"connection", b"close")]


def _record(**changes: Any) -> Any:
    arguments: dict[str, Any] = {
        "status": 201,
        "headers": _HEADERS,
        "chunks": [b"do", b"ne"],
        "size": 4,
        "failed": False,
        "kept": True,
        "too_large": False,
        "unknown": False,
    }
    policy = changes.pop("policy", Policy(ttl=100, unknown_outcome_ttl=7))
    arguments |= changes
    status = arguments.pop("status")
    headers = arguments.pop("headers")
    chunks = arguments.pop("chunks")
    return record_for(policy, status, headers, chunks, **arguments)


@pytest.mark.parametrize(
    ("changes", "payload", "ttl"),
    [
        pytest.param({}, encode_response(201, [(b"content-type", b"text/plain")], b"done"), 100, id="kept: stored"),
        pytest.param({"failed": True}, None, 0, id="raised: released"),
        pytest.param({"kept": False}, None, 0, id="a status not kept: released"),
        pytest.param({"too_large": True}, TooLargeMarker(201), 100, id="too large: the marker"),
        pytest.param({"unknown": True}, OutcomeUnknownMarker(201), 7, id="unknown: kept, for unknown_outcome_ttl"),
        pytest.param({"unknown": True, "failed": True}, OutcomeUnknownMarker(201), 7, id="unknown wins over failed"),
        pytest.param({"status": 204}, TooLargeMarker(204, "unsendable"), 100, id="a body on a 204: unsendable"),
        pytest.param(
            {"headers": [(b"content-length", b"9")]}, TooLargeMarker(201, "unsendable"), 100, id="a wrong length"
        ),
        pytest.param(
            {"headers": [(b"content-length", b"9")], "head": True},
            encode_response(201, [(b"content-length", b"9")], b"done"),
            100,
            id="HEAD keeps its Content-Length",
        ),
    ],
)
def test_record_for(changes: dict[str, Any], payload: object, ttl: float) -> None:
    recorded = _record(**changes)
    assert recorded.ttl == ttl
    if payload is None or isinstance(payload, bytes):
        assert recorded.payload == payload
    else:
        assert recorded.payload is not None
        assert decode_response(recorded.payload) == payload


@pytest.mark.parametrize(
    ("changes", "policy"),
    [
        pytest.param({}, Policy(ttl=100), id="a response"),
        pytest.param({}, Policy(replay_set_cookie=True), id="Set-Cookie kept"),
        pytest.param({"status": 204}, Policy(ttl=100), id="a body on a 204: unsendable"),
        pytest.param({"headers": [(b"content-length", b"9")]}, Policy(ttl=100), id="a wrong length"),
        pytest.param({"headers": [(b"content-length", b"9")], "head": True}, Policy(ttl=100), id="HEAD"),
        pytest.param({"headers": [], "chunks": [], "size": 0}, Policy(ttl=5), id="nothing"),
    ],
)
def test_record_response_is_record_for_of_a_response_kept_whole(changes: dict[str, Any], policy: Policy) -> None:
    """The faces' way after a response like any other (kept, whole, its outcome known): what record_for says."""
    arguments: dict[str, Any] = {"status": 201, "headers": _HEADERS, "chunks": [b"do", b"ne"], "size": 4, "head": False}
    arguments |= changes
    expected = record_for(policy, **arguments, failed=False, kept=True, too_large=False, unknown=False)
    recorded = record_response(policy, **arguments)
    assert type(recorded) is type(expected)
    assert (recorded.payload, recorded.ttl) == (expected.payload, expected.ttl)
    assert str(recorded.unsendable) == str(expected.unsendable)


def test_replay_set_cookie_keeps_set_cookie() -> None:
    recorded = _record(policy=Policy(replay_set_cookie=True))
    stored = decode_response(recorded.payload)
    assert isinstance(stored, StoredResponse)
    assert (b"set-cookie", b"s=1") in stored.headers


# -- replays -------------------------------------------------------------------------------------------------------


def test_replay_of_a_response_is_the_response() -> None:
    assert replay(encode_response(200, [(b"a", b"b")], b"body")) == (200, [(b"a", b"b")], b"body")


@pytest.mark.parametrize(
    ("payload", "error", "reason"),
    [
        pytest.param(b"\x01\x00", ResponseNotStoredError, "unreadable", id="corrupt: 410 unreadable"),
        pytest.param(encode_not_stored(201, "too_large"), ResponseNotStoredError, "too_large", id="marker: 410"),
        pytest.param(encode_outcome_unknown(504), OutcomeUnknownError, None, id="unknown marker: 503"),
    ],
)
def test_replay_of_what_is_not_a_response_is_its_error(payload: bytes, error: type, reason: str | None) -> None:
    answer = replay(payload)
    assert isinstance(answer, error)
    if reason is not None:
        assert isinstance(answer, ResponseNotStoredError)
        assert answer.reason == reason


# -- the policy ----------------------------------------------------------------------------------------------------


def test_the_policys_defaults() -> None:
    assert (POLICY.ttl, POLICY.lease, POLICY.header, POLICY.methods) == (
        86_400,
        30,
        "Idempotency-Key",
        {*DEFAULT_METHODS},
    )
    assert POLICY.kept_unknown_for == POLICY.ttl
    assert POLICY.header_name == b"idempotency-key"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"ttl": 0}, "ttl=0: must be positive", id="ttl"),
        pytest.param({"lease": -1}, "lease=-1: must be positive", id="lease"),
        pytest.param({"unknown_outcome_ttl": 0}, "unknown_outcome_ttl=0: must be positive", id="unknown ttl"),
        pytest.param({"on_conflict": "queue"}, "expected one of reject, wait", id="on_conflict"),
        pytest.param({"on_store_error": "maybe"}, "expected one of fail_closed, fail_open", id="on_store_error"),
        pytest.param({"max_request_bytes": -1}, "must not be negative", id="a negative size"),
        pytest.param({"header": "Idempotency Key"}, "must be a header name", id="header"),
        pytest.param({"methods": ()}, "must name at least one method", id="methods"),
        pytest.param({"require_key": "yes"}, "must be True, False or a predicate", id="require_key"),
    ],
)
def test_the_policy_refuses_what_is_out_of_range(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Policy(**options)


def test_methods_are_kept_upper_case_and_a_single_name_is_one_method() -> None:
    assert Policy(methods=["post", "Put"]).methods == {"POST", "PUT"}
    assert Policy(methods="post").methods == {"POST"}


def test_the_typed_options_are_the_policys_fields() -> None:
    assert set(PolicyOptions.__annotations__) == {field.name for field in dataclasses.fields(Policy)}


def test_every_option_has_a_help_text_with_its_default() -> None:
    assert option_doc("ttl").endswith("(default 86400)")
    assert option_doc("methods").endswith("(default POST,PUT,PATCH,DELETE)")
    for field in dataclasses.fields(Policy):
        assert option_doc(field.name)


# -- the README's contract table is the table's -----------------------------------------------------------------


def test_the_readme_shows_the_contract_table_as_the_code_decides_it() -> None:
    readme = README.read_text()
    start = readme.index("| situation | response |")
    end = readme.index("\n\n", start)
    assert readme[start:end] == render_rows()


def test_every_row_names_a_function_of_the_table() -> None:
    import idempo._core.decide as table

    for row in ROWS:
        assert callable(getattr(table, row.decided_by)), row
