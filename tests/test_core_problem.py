"""RFC 9457 problem documents: their JSON, the response that carries them, and one per request error."""

from __future__ import annotations

import json

import pytest

from idempo import (
    BodyTooLargeError,
    InProgressError,
    InvalidKeyError,
    KeyReuseError,
    MissingKeyError,
    RequestError,
    ResponseNotStoredError,
)
from idempo._core.problem import Problem


def test_to_json_has_the_rfc_9457_members() -> None:
    problem = Problem("urn:idempo:problem:in-progress", "In progress", 409, "retry later")
    assert json.loads(problem.to_json()) == {
        "type": "urn:idempo:problem:in-progress",
        "title": "In progress",
        "status": 409,
        "detail": "retry later",
    }
    assert problem.to_json() == (  # compact, members in RFC order
        b'{"type":"urn:idempo:problem:in-progress","title":"In progress","status":409,"detail":"retry later"}'
    )


def test_to_json_adds_extensions() -> None:
    problem = Problem("urn:x", "Gone", 410, "d", {"original_status": 201, "note": "é"})
    document = json.loads(problem.to_json())
    assert (document["original_status"], document["note"], document["status"]) == (201, "é", 410)


@pytest.mark.parametrize("retry_after", [None, 1, 30])
def test_render(retry_after: int | None) -> None:
    problem = Problem("urn:idempo:problem:store-unavailable", "Unavailable", 503, "the store is down")
    status, headers, body = problem.render(retry_after=retry_after)
    assert status == 503
    assert body == problem.to_json()
    expected = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        expected.append((b"retry-after", str(retry_after).encode()))
    assert headers == expected


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [
        pytest.param(InvalidKeyError("the key is empty"), 400, "invalid-key", id="invalid key"),
        pytest.param(MissingKeyError("send a key"), 400, "missing-key", id="missing key"),
        pytest.param(BodyTooLargeError("over 1 MiB"), 413, "body-too-large", id="body too large"),
        pytest.param(InProgressError("still running", retry_after=4), 409, "in-progress", id="in progress"),
        pytest.param(KeyReuseError("other request"), 422, "key-reused", id="key reused"),
        pytest.param(ResponseNotStoredError("too large", original_status=201), 410, "response-not-stored", id="410"),
    ],
)
def test_from_error(error: RequestError, status: int, slug: str) -> None:
    problem = Problem.from_error(error)
    assert (problem.type, problem.title, problem.status, problem.detail) == (
        f"urn:idempo:problem:{slug}",
        type(error).title,
        status,
        str(error),
    )
    document = json.loads(problem.to_json())
    if isinstance(error, ResponseNotStoredError):
        assert document["original_status"] == 201
    else:
        assert set(document) == {"type", "title", "status", "detail"}
    assert Problem.from_error(error, base_uri="https://example.com/problems/").type == (
        f"https://example.com/problems/{slug}"
    )


def test_service_unavailable() -> None:
    problem = Problem.service_unavailable("the store timed out")
    assert (problem.type, problem.status, problem.detail) == (
        "urn:idempo:problem:store-unavailable",
        503,
        "the store timed out",
    )
    assert Problem.service_unavailable("x", base_uri="https://e.com/p/").type == "https://e.com/p/store-unavailable"


def test_titles_are_fixed_per_type() -> None:
    first = Problem.from_error(KeyReuseError("one detail"))
    second = Problem.from_error(KeyReuseError("another detail"))
    assert first.title == second.title
    assert first.detail != second.detail
