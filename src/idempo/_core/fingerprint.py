"""Request fingerprints and principals: digests that say *what* is asked and *who* asks."""

from __future__ import annotations

import functools
import hashlib
import json

__all__ = [
    "CANONICAL_JSON_MAX_BYTES",
    "canonical_json_body",
    "fingerprint_request",
    "media_type",
    "principal_digest",
    "scoped_key",
]


# The length-prefixed method, path and query of recent requests: the same endpoints come back, and building the
# prefix costs more than hashing it. Bounded, and only for short paths and queries.
_HEADS: dict[tuple[str, str, bytes, bytes], bytes] = {}
_HEADS_MAX = 1024
_HEAD_MAX_LENGTH = 512
# Bodies up to this size are hashed in one call, with the prefix; larger ones apart, so that they are never copied.
_SMALL_BODY = 16 * 1024
_sha256 = hashlib.sha256


def _head(method: str, path: str, query: bytes, content_type: bytes) -> bytes:
    method_bytes = method.encode("ascii")
    path_bytes = path.encode("utf-8", "surrogateescape")
    media = media_type(content_type)
    return b"".join(
        (
            len(method_bytes).to_bytes(8, "big"),
            method_bytes,
            len(path_bytes).to_bytes(8, "big"),
            path_bytes,
            len(query).to_bytes(8, "big"),
            query,
            len(media).to_bytes(8, "big"),
            media,
        )
    )


def media_type(content_type: bytes) -> bytes:
    """The media type of a ``Content-Type`` value, lower-cased and without its parameters:
    ``b"application/json"`` for ``b"Application/JSON; charset=utf-8"``."""
    return content_type.partition(b";")[0].strip().lower()


def fingerprint_request(method: str, path: str, query: bytes, body: bytes, content_type: bytes = b"") -> str:
    """SHA-256 over method, path, raw query string, the body's media type and the body, each length-prefixed so
    that no two different requests can produce the same input (``/a`` + ``b=1`` never collides with ``/ab`` +
    ``=1``).

    The media type (:func:`media_type` of *content_type*: ``application/json``, without parameters such as the
    charset) counts because the same bytes sent as JSON and as a form ask for different things; its parameters do
    not, so that a client which adds ``; charset=utf-8`` to a retry is still retrying.

    Returns:
        A 64-character hex digest.
    """
    request = (method, path, query, content_type)
    head = _HEADS.get(request)
    if head is None:
        head = _head(method, path, query, content_type)
        if len(path) + len(query) + len(content_type) <= _HEAD_MAX_LENGTH:
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[request] = head
    size = len(body)
    if size <= _SMALL_BODY:
        return _sha256(head + size.to_bytes(8, "big") + body).hexdigest()
    digest = _sha256(head + size.to_bytes(8, "big"))
    digest.update(body)  # the body apart, so that a large one is never copied
    return digest.hexdigest()


CANONICAL_JSON_MAX_BYTES = 64 * 1024
"""The largest body :func:`canonical_json_body` canonicalises by default. Parsing and re-serialising holds the
interpreter (a thread would not free the event loop: the ``json`` module keeps the GIL): about 2 ms for 64 KiB on a
small server, but 60-90 ms for 1 MiB and 1-2 s for 10 MiB, during which every other request and every lease
renewal of the process waits."""


def canonical_json_body(body: bytes, max_bytes: int = CANONICAL_JSON_MAX_BYTES) -> bytes:
    """The body in canonical JSON (sorted keys, no insignificant whitespace), so that two encodings of the same
    document fingerprint alike. A body that is not JSON, or is over *max_bytes*, is returned unchanged (so two
    encodings of such a body are two requests: a 422, never a wrong replay)."""
    if len(body) > max_bytes:
        return body
    try:
        document = json.loads(body)
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be a body worth canonicalising
        return body


@functools.lru_cache(maxsize=4096)
def principal_digest(principal: str | bytes) -> str:
    """A fixed-length digest of a principal (32 hex characters, 128 bits), so that principals never appear in
    the store in clear and the store key stays unambiguous whatever the principal contains. Cached: the same
    callers come back."""
    data = principal.encode("utf-8") if isinstance(principal, str) else principal
    return hashlib.sha256(data).hexdigest()[:32]


def scoped_key(principal_hash: str, key: str) -> str:
    """The store key of *key* for the principal whose digest is *principal_hash*."""
    return f"{principal_hash}:{key}"
