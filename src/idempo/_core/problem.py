"""RFC 9457 problem details, the body of every error the middleware answers itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import RequestError, ResponseNotStoredError

__all__ = ["DEFAULT_PROBLEM_BASE", "Problem"]

DEFAULT_PROBLEM_BASE = "urn:idempo:problem:"
"""The prefix of problem ``type`` URIs: an identifier, not a page (``docs/problems.md`` describes each type).
Set ``problem_base_uri`` to point them at your own documentation."""


@dataclass(frozen=True, slots=True)
class Problem:
    """An RFC 9457 problem detail, sent as ``application/problem+json``.

    The title is fixed per problem type; the detail describes this occurrence. Neither ever mentions another
    principal's records.
    """

    type: str
    title: str
    status: int
    detail: str
    extensions: dict[str, Any] = field(default_factory=dict)
    media_type: ClassVar[str] = "application/problem+json"

    @classmethod
    def from_error(cls, error: RequestError, *, base_uri: str = DEFAULT_PROBLEM_BASE) -> Problem:
        """The problem document for a :class:`RequestError`."""
        extensions: dict[str, Any] = {}
        if isinstance(error, ResponseNotStoredError):
            extensions["original_status"] = error.original_status
            extensions["reason"] = error.reason
        return cls(base_uri + error.slug, error.title, error.status, str(error), extensions)

    @classmethod
    def service_unavailable(cls, detail: str, *, base_uri: str = DEFAULT_PROBLEM_BASE) -> Problem:
        """The 503 answered when the store cannot be reached."""
        return cls(base_uri + "store-unavailable", "Idempotency store unavailable", 503, detail)

    def to_json(self) -> bytes:
        """The document as compact JSON bytes."""
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        body.update(self.extensions)
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    def render(self, *, retry_after: int | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body of the response that carries this document.

        Args:
            retry_after: seconds for a ``Retry-After`` header, where the client should wait before retrying.
        """
        body = self.to_json()
        headers = [
            (b"content-type", self.media_type.encode("ascii")),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode("ascii")))
        return self.status, headers, body
