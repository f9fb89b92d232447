"""idempo: run a retried HTTP mutation once, and replay its response to every retry.

The client sends ``Idempotency-Key: <unique value>`` with a POST, PUT, PATCH or DELETE; the server runs the
operation once and answers every retry with the stored response::

    from fastapi import FastAPI
    from idempo import IdempotencyMiddleware

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store="sqlite:///idempo.db")

The public API is what this module exports; everything in a module whose name starts with ``_`` is private.
"""

from __future__ import annotations

from typing import Any

from ._core.codec import OutcomeUnknownMarker, StoredResponse, TooLargeMarker, decode_response, encode_response
from ._core.decide import Conflict, Decision, Mismatch, NotStored, Replay, Unknown, decide, should_store
from ._core.errors import (
    BodyTooLargeError,
    ConfigurationError,
    IdempoError,
    InProgressError,
    InvalidKeyError,
    KeyReuseError,
    MissingDependency,
    MissingKeyError,
    OutcomeUnknownError,
    RequestError,
    ResponseNotStoredError,
    StoreError,
    StoreFullError,
)
from ._core.fingerprint import canonical_json_body, fingerprint_request, principal_digest
from ._core.keys import parse_key
from ._core.outcome import mark_outcome_unknown
from ._core.problem import Problem
from ._core.records import Acquired, Claim, Existing, Record, State
from .asgi import IdempotencyMiddleware, authorization_principal, default_principal
from .decorators import idempotent
from .observe import Observer
from .stores import Store, store_from_url
from .stores.memory import MemoryStore
from .stores.sqlite import SQLiteStore

__all__ = [
    "Acquired",
    "BodyTooLargeError",
    "Claim",
    "ConfigurationError",
    "Conflict",
    "Decision",
    "Existing",
    "IdempoError",
    "IdempotencyMiddleware",
    "InProgressError",
    "InvalidKeyError",
    "KeyReuseError",
    "MemoryStore",
    "Mismatch",
    "MissingDependency",
    "MissingKeyError",
    "NotStored",
    "Observer",
    "OutcomeUnknownError",
    "OutcomeUnknownMarker",
    "Problem",
    "Record",
    "Replay",
    "RequestError",
    "ResponseNotStoredError",
    "SQLiteStore",
    "State",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoredResponse",
    "TooLargeMarker",
    "Unknown",
    "authorization_principal",
    "canonical_json_body",
    "decide",
    "decode_response",
    "default_principal",
    "encode_response",
    "fingerprint_request",
    "idempotent",
    "mark_outcome_unknown",
    "parse_key",
    "principal_digest",
    "should_store",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("idempo")
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
