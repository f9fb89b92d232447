"""Request fingerprints and principals: digests that say *what* is asked and *who* asks."""

from __future__ import annotations

import functools
import hashlib
import json

__all__ = ["canonical_json_body", "fingerprint_request", "principal_digest", "scoped_key"]


# The length-prefixed method, path and query of recent requests: the same endpoints come back, and building the
# prefix costs more than hashing it. Bounded, and only for short paths and queries.
_HEADS: dict[tuple[str, str, bytes], bytes] = {}
_HEADS_MAX = 1024
_HEAD_MAX_LENGTH = 512
# Bodies up to this size are hashed in one call, with the prefix; larger ones apart, so that they are never copied.
_SMALL_BODY = 16 * 1024
_sha256 = hashlib.sha256


def _head(method: str, path: str, query: bytes) -> bytes:
    method_bytes = method.encode("ascii")
    path_bytes = path.encode("utf-8", "surrogateescape")
    return b"".join(
        (
            len(method_bytes).to_bytes(8, "big"),
            method_bytes,
            len(path_bytes).to_bytes(8, "big"),
            path_bytes,
            len(query).to_bytes(8, "big"),
            query,
        )
    )


def fingerprint_request(method: str, path: str, query: bytes, body: bytes) -> str:
    """SHA-256 over method, path, raw query string and body, each length-prefixed so that no two different
    requests can produce the same input (``/a`` + ``b=1`` never collides with ``/ab`` + ``=1``).

    Returns:
        A 64-character hex digest.
    """
    request = (method, path, query)
    head = _HEADS.get(request)
    if head is None:
        head = _head(method, path, query)
        if len(path) + len(query) <= _HEAD_MAX_LENGTH:
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[request] = head
    size = len(body)
    if size <= _SMALL_BODY:
        return _sha256(head + size.to_bytes(8, "big") + body).hexdigest()
    digest = _sha256(head + size.to_bytes(8, "big"))
    digest.update(body)  # the body apart, so that a large one is never copied
    return digest.hexdigest()


def canonical_json_body(body: bytes) -> bytes:
    """The body in canonical JSON (sorted keys, no insignificant whitespace), so that two encodings of the same
    document fingerprint alike. A body that is not JSON is returned unchanged."""
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
