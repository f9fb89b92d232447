"""decide and should_store: the decision table of the HTTP contract."""

from __future__ import annotations

import pytest

from idempo import InProgressError, KeyReuseError, Record, State
from idempo._core.codec import encode_not_stored, encode_outcome_unknown, encode_response, encode_too_large
from idempo._core.decide import (
    Conflict,
    Decision,
    Mismatch,
    NotStored,
    Replay,
    Unknown,
    decide,
    fallback,
    next_record_pause,
    replayable,
    should_store,
)

NOW = 1_000_000.0


def record(state: State, fingerprint: str = "fp", *, lease_left: float = 30, payload: bytes | None = None) -> Record:
    token = "" if state is State.COMPLETED else "owner"
    return Record("k", state, fingerprint, token, NOW - 5, NOW + lease_left, NOW + 86400, payload)


@pytest.mark.parametrize(
    ("stored", "fingerprint", "expected"),
    [
        pytest.param(record(State.COMPLETED, payload=b"response"), "fp", Replay(b"response"), id="completed, same"),
        pytest.param(record(State.COMPLETED, payload=b""), "fp", Replay(b""), id="completed empty payload, same"),
        pytest.param(record(State.COMPLETED, payload=b"response"), "other", Mismatch(), id="completed, other"),
        pytest.param(record(State.IN_PROGRESS), "fp", Conflict(30), id="in progress, same"),
        pytest.param(record(State.IN_PROGRESS), "other", Mismatch(), id="in progress, other"),
        pytest.param(record(State.IN_PROGRESS, lease_left=-10), "fp", Conflict(1), id="stale, same"),
        pytest.param(record(State.IN_PROGRESS, lease_left=-10), "other", Mismatch(), id="stale, other"),
        pytest.param(record(State.COMPLETED, payload=None), "fp", Conflict(30), id="completed without payload, same"),
        pytest.param(record(State.COMPLETED, payload=None), "other", Mismatch(), id="completed without payload, other"),
        pytest.param(record(State.COMPLETED, "", payload=b"x"), "", Replay(b"x"), id="empty fingerprints, same"),
        pytest.param(record(State.COMPLETED, "FP", payload=b"x"), "fp", Mismatch(), id="fingerprint case matters"),
        pytest.param(
            record(State.COMPLETED, payload=encode_too_large(201)), "fp", NotStored(201, "too_large"), id="too large"
        ),
        pytest.param(
            record(State.COMPLETED, payload=encode_not_stored(200, "store_refused")),
            "fp",
            NotStored(200, "store_refused"),
            id="store full",
        ),
        pytest.param(
            record(State.COMPLETED, payload=encode_outcome_unknown(504)), "fp", Unknown(86400), id="outcome unknown"
        ),
        pytest.param(
            record(State.COMPLETED, payload=encode_outcome_unknown(504)), "other", Mismatch(), id="unknown, other"
        ),
        pytest.param(record(State.COMPLETED, payload=b"\x02\x00"), "fp", NotStored(0, "unreadable"), id="torn marker"),
        pytest.param(record(State.COMPLETED, payload=b"\x03"), "fp", NotStored(0, "unreadable"), id="torn unknown"),
    ],
)
def test_decide(stored: Record, fingerprint: str, expected: Decision) -> None:
    assert decide(stored, fingerprint, now=NOW, retry_after=3600) == expected


_RESPONSE = encode_response(200, [(b"content-type", b"application/json")], b"{}")


@pytest.mark.parametrize(
    ("stored", "fingerprint", "payload"),
    [
        pytest.param(record(State.COMPLETED, payload=_RESPONSE), "fp", _RESPONSE, id="a response, same: replayed"),
        pytest.param(record(State.COMPLETED, payload=_RESPONSE), "other", None, id="a response, other: ask decide"),
        pytest.param(record(State.IN_PROGRESS, payload=_RESPONSE), "fp", None, id="in progress: ask decide"),
        pytest.param(record(State.IN_PROGRESS), "fp", None, id="in progress, no payload"),
        pytest.param(record(State.COMPLETED, payload=None), "fp", None, id="completed without payload"),
        pytest.param(record(State.COMPLETED, payload=b""), "fp", None, id="empty payload: ask decide"),
        pytest.param(record(State.COMPLETED, payload=encode_too_large(201)), "fp", None, id="a marker"),
        pytest.param(record(State.COMPLETED, payload=encode_outcome_unknown(504)), "fp", None, id="unknown marker"),
        pytest.param(record(State.COMPLETED, payload=b"\x04result"), "fp", None, id="a function's result"),
    ],
)
def test_replayable_is_decides_replay_of_a_response(stored: Record, fingerprint: str, payload: bytes | None) -> None:
    """The fast path the middleware takes first: the payload exactly where decide() replays a response, else None
    (and then decide() is asked)."""
    assert replayable(stored, fingerprint) == payload
    if payload is not None:
        assert decide(stored, fingerprint, now=NOW) == Replay(payload)


@pytest.mark.parametrize(
    ("retry_after", "lease_left", "expected"),
    [
        pytest.param(1.0, 30, 1, id="default"),
        pytest.param(5, 30, 5, id="retry_after sooner"),
        pytest.param(5, 2.5, 3, id="lease sooner, rounded up"),
        pytest.param(5, 2.0001, 3, id="rounded up, never down"),
        pytest.param(10, 10, 10, id="equal"),
        pytest.param(2.1, 30, 3, id="fractional retry_after rounded up"),
        pytest.param(0.5, 30, 1, id="at least one second"),
        pytest.param(0, 30, 1, id="zero retry_after"),
        pytest.param(5, 0.2, 1, id="lease almost over"),
        pytest.param(5, 0, 1, id="lease just over"),
        pytest.param(5, -100, 1, id="lease long over"),
    ],
)
def test_conflict_retry_after(retry_after: float, lease_left: float, expected: int) -> None:
    decision = decide(record(State.IN_PROGRESS, lease_left=lease_left), "fp", now=NOW, retry_after=retry_after)
    assert decision == Conflict(expected)
    assert isinstance(decision, Conflict)
    assert type(decision.retry_after) is int


def test_decide_default_retry_after_is_one_second() -> None:
    assert decide(record(State.IN_PROGRESS, lease_left=30), "fp", now=NOW) == Conflict(1)


def test_conflict_error() -> None:
    error = Conflict(7).error()
    assert isinstance(error, InProgressError)
    assert (error.status, error.retry_after, error.slug) == (409, 7, "in-progress")


def test_mismatch_error() -> None:
    error = Mismatch().error()
    assert isinstance(error, KeyReuseError)
    assert (error.status, error.slug) == (422, "key-reused")


@pytest.mark.parametrize(
    ("status", "stored", "stored_with_server_errors"),
    [
        (200, True, True),
        (201, True, True),
        (204, True, True),
        (301, True, True),
        (302, True, True),
        (400, True, True),
        (404, True, True),
        (408, False, False),
        (409, False, False),
        (410, True, True),
        (422, True, True),
        (425, False, False),
        (429, False, False),
        (500, False, True),
        (502, False, True),
        (503, False, True),
        (504, False, True),
    ],
)
def test_should_store(status: int, stored: bool, stored_with_server_errors: bool) -> None:
    assert should_store(status) is stored
    assert should_store(status, store_server_errors=False) is stored
    assert should_store(status, store_server_errors=True) is stored_with_server_errors


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(b"\x01\x00\xc8\x00\x00body", encode_not_stored(201, "store_refused"), id="a response"),
        pytest.param(b"\x04result", encode_not_stored(201, "store_refused"), id="a decorated function's result"),
        pytest.param(encode_too_large(201), None, id="a marker already"),
        pytest.param(encode_outcome_unknown(504), None, id="the unknown marker"),
    ],
)
def test_fallback_is_the_not_stored_marker_unless_there_is_nothing_smaller(
    payload: bytes, expected: bytes | None
) -> None:
    assert fallback(payload, 201) == expected


def test_an_unknown_outcome_asks_to_come_back_when_the_record_expires() -> None:
    stored = Record("k", State.COMPLETED, "fp", "", NOW - 5, NOW, NOW + 90.2, encode_outcome_unknown(504))
    decision = decide(stored, "fp", now=NOW)
    assert decision == Unknown(91)
    error = decision.error()
    assert (error.status, error.slug, error.retry_after) == (503, "outcome-unknown", 91)


@pytest.mark.parametrize(
    ("delay", "pause"),
    [
        pytest.param(0.0, 0.05, id="after a try made at once: the first pause"),
        pytest.param(0.05, 0.1, id="then twice the last"),
        pytest.param(0.4, 0.8, id="still doubling"),
        pytest.param(0.8, 1.0, id="up to a second"),
        pytest.param(1.0, 1.0, id="and no more"),
    ],
)
def test_the_pauses_between_tries_to_record_an_outcome(delay: float, pause: float) -> None:
    assert next_record_pause(delay) == pause
