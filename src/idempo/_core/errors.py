"""The exceptions idempo raises.

The tree::

    * IdempoError
      x ConfigurationError      bad URL, unknown scheme, invalid option (raised at start-up)
        + MissingDependency     an extra isn't installed; also an ImportError
      x StoreError              the backend failed or timed out; ``__cause__`` is the driver's exception
        + StoreFullError        the backend refused a write for want of room (Redis at maxmemory, a full disk)
      x TransactionError        recording a response in the application's own database transaction went wrong
        + NotClaimedError       no keyed request is running here (no key, fail-open, outside the app, done)
        + WrongDatabaseError    the transaction is not on the store's database (or the store is not SQL)
        + KeyTakenOverError     the key is no longer this request's: the transaction must not commit
      x RequestError            the client's fault; ``.status``, ``.title``, ``.slug`` -> problem+json
        + InvalidKeyError       400  the key is empty, too long or not visible ASCII
        + MissingKeyError       400  a key is required here and none was sent
        + BodyTooLargeError     413  the request body is over ``max_request_bytes``
        + InProgressError       409  another request with this key is still running
        + KeyReuseError         422  the key was first used with a different request
        + ResponseNotStoredError 410 the operation ran, but its response was not kept (too large, store full...)
        + OutcomeUnknownError   503 the first request's outcome is unknown; the key stays taken until resolved

``RequestError`` carries what the HTTP layer needs to render an RFC 9457 problem document, so the
middleware and the ``@idempotent`` decorator raise and render the same errors.
"""

from __future__ import annotations

from .outcome import mark_outcome_unknown

__all__ = [
    "BodyTooLargeError",
    "ConfigurationError",
    "IdempoError",
    "InProgressError",
    "InvalidKeyError",
    "KeyReuseError",
    "KeyTakenOverError",
    "MissingDependency",
    "MissingKeyError",
    "NotClaimedError",
    "OutcomeUnknownError",
    "RequestError",
    "ResponseNotStoredError",
    "StoreError",
    "StoreFullError",
    "TransactionError",
    "WrongDatabaseError",
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


class StoreFullError(StoreError):
    """The store refused a write for want of room: Redis at ``maxmemory`` under ``noeviction``, a full disk, a
    memory store at its bound. The store is up: a smaller write may still land, so after an operation ran, the
    middleware and the decorator complete its key with the few bytes of the "not stored" marker instead of its
    response, and a retry gets a 410 rather than running it again.
    """


class TransactionError(IdempoError):
    """Recording a response inside the application's own database transaction
    (:func:`idempo.transactions.record`) went wrong. Raised inside that transaction: let it propagate, so that the
    transaction rolls back with the business writes."""


class NotClaimedError(TransactionError, RuntimeError):
    """No keyed request is running here: the request had no ``Idempotency-Key``, the store failed and
    ``on_store_error="fail_open"`` let it through, the call is outside a request idempo runs, or the request's
    response was recorded already. Check :func:`idempo.transactions.claimed` first where that can happen."""


class WrongDatabaseError(TransactionError, ConfigurationError):
    """The transaction is on another database than the store's, or the store cannot take part in a transaction of
    the application's (the memory and Redis stores). Point the store at the application's database
    (:func:`idempo.transactions.store_for`)."""


class KeyTakenOverError(TransactionError):
    """The key is no longer this request's: its lease ran out and a retry took it over (or this request's response
    was recorded by another transaction already). The transaction must roll back, so that the operation does not
    take effect twice: let the exception propagate."""


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
    """The first request ran to completion, but its response (or, for ``@idempotent``, its result) was not kept.

    The operation is not run again. ``original_status`` is the status the first response had; ``reason`` says
    why it was not kept: ``"too_large"`` (over ``max_response_bytes``), ``"store_refused"`` (the store was full),
    ``"unsendable"`` (the server could not send it as it was), ``"unserializable"`` (a result the serializer
    cannot store), ``"unreadable"`` (the stored copy is corrupt) or ``"operator"`` (resolved by hand with
    ``idempo keys resolve --ran``).
    """

    status = 410
    title = "The original response was not stored"
    slug = "response-not-stored"

    def __init__(self, message: str, *, original_status: int, reason: str = "too_large") -> None:
        super().__init__(message)
        self.original_status = original_status
        self.reason = reason


class OutcomeUnknownError(RequestError):
    """Whether the operation happened is unknown, so it must not run again, and there is no response to replay.

    An application raises it (or calls :func:`idempo.mark_outcome_unknown`) when a call it made downstream may
    have taken effect without it learning the result (a payment provider timed out after the request was sent).
    The key then stays taken in an "outcome unknown" state: every retry gets a 503 ``outcome-unknown`` problem
    with ``Retry-After`` (``retry_after``), until the record expires (``unknown_outcome_ttl``) or an operator
    resolves it with ``idempo keys resolve``. A new key would run the operation again: clients keep the key.

    Attributes:
        retry_after: whole seconds until the state may be resolved (the record's remaining life).
    """

    status = 503
    title = "The outcome of the request with this Idempotency-Key is unknown"
    slug = "outcome-unknown"

    def __init__(self, message: str = "the outcome of this operation is unknown", *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # Made inside a keyed operation, it marks that operation, even if something between the raise and the
        # middleware (Starlette's ServerErrorMiddleware, a framework's exception handler) turns it into a 500 first.
        mark_outcome_unknown()

    @classmethod
    def recorded(cls, message: str, *, retry_after: int) -> OutcomeUnknownError:
        """The error a retry gets for a key already in the "outcome unknown" state (it marks nothing). Private."""
        error = cls.__new__(cls)
        RequestError.__init__(error, message)
        error.retry_after = retry_after
        return error
