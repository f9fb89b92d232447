"""The exceptions idempo raises.

The tree::

    * IdempoError
      x ConfigurationError      bad URL, unknown scheme, invalid option (raised at start-up)
        + MissingDependency     an extra isn't installed; also an ImportError
      x StoreError              the backend failed or timed out; ``__cause__`` is the driver's exception
      x RequestError            the client's fault; ``.status``, ``.title``, ``.slug`` -> problem+json
        + InvalidKeyError       400  the key is empty, too long or not visible ASCII
        + MissingKeyError       400  a key is required here and none was sent
        + BodyTooLargeError     413  the request body is over ``max_request_bytes``
        + InProgressError       409  another request with this key is still running
        + KeyReuseError         422  the key was first used with a different request
        + ResponseNotStoredError 410 the operation ran, but its response was too large to keep

``RequestError`` carries what the HTTP layer needs to render an RFC 9457 problem document, so the
middleware and the ``@idempotent`` decorator raise and render the same errors.
"""

from __future__ import annotations

__all__ = [
    "BodyTooLargeError",
    "ConfigurationError",
    "IdempoError",
    "InProgressError",
    "InvalidKeyError",
    "KeyReuseError",
    "MissingDependency",
    "MissingKeyError",
    "RequestError",
    "ResponseNotStoredError",
    "StoreError",
]


class IdempoError(Exception):
    """Base class of every exception idempo raises on purpose."""


class ConfigurationError(IdempoError, ValueError):
    """An option, a store URL or a scheme is invalid. Raised at start-up, never per request."""


class MissingDependency(ConfigurationError, ImportError):
    """An optional dependency (an *extra*) is not installed. Still catchable as ``ImportError``."""


class StoreError(IdempoError):
    """The store failed or timed out. The driver's own exception is ``__cause__``.

    The middleware answers 503 (or, with ``on_store_error="fail_open"``, runs the app unprotected).
    """


class RequestError(IdempoError):
    """The request cannot be honoured; the client should change something (or wait) and retry.

    Attributes:
        status: the HTTP status the middleware answers with.
        title: a fixed, human-readable summary of the problem type.
        slug: the last part of the problem ``type`` URI.
    """

    status: int = 400
    title: str = "Bad idempotent request"
    slug: str = "bad-request"


class InvalidKeyError(RequestError):
    """The ``Idempotency-Key`` header is malformed: empty, over 255 characters or not visible ASCII."""

    status = 400
    title = "Invalid Idempotency-Key"
    slug = "invalid-key"


class MissingKeyError(RequestError):
    """This endpoint requires an ``Idempotency-Key`` header and the request has none."""

    status = 400
    title = "Idempotency-Key required"
    slug = "missing-key"


class BodyTooLargeError(RequestError):
    """The request body is larger than ``max_request_bytes``, so it cannot be fingerprinted."""

    status = 413
    title = "Request body too large"
    slug = "body-too-large"


class InProgressError(RequestError):
    """A request with the same key is still running. Retry after ``retry_after`` seconds.

    Attributes:
        retry_after: whole seconds the client should wait before retrying.
    """

    status = 409
    title = "A request with this Idempotency-Key is in progress"
    slug = "in-progress"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KeyReuseError(RequestError):
    """The key was first used with a different request (method, path, query or body).

    Send a new key for a new request; never reuse one with another payload.
    """

    status = 422
    title = "Idempotency-Key reused with a different request"
    slug = "key-reused"


class ResponseNotStoredError(RequestError):
    """The first request ran to completion, but its response was too large to store.

    The operation is not run again. The client received the whole response the first time; a retry
    cannot get it back. ``original_status`` is the status that first response had.
    """

    status = 410
    title = "The original response was too large to store"
    slug = "response-not-stored"

    def __init__(self, message: str, *, original_status: int) -> None:
        super().__init__(message)
        self.original_status = original_status
