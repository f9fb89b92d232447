"""idempo: run a retried HTTP mutation once, and replay its response to every retry.

The client sends ``Idempotency-Key: <unique value>`` with a POST, PUT, PATCH or DELETE; the server runs the
operation once and answers every retry with the stored response::

    from fastapi import FastAPI
    from idempo import IdempotencyMiddleware

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store="sqlite:///idempo.db")

The public API is what this module exports (user-facing names: the middleware and its :class:`Policy`, the decorator,
the stores and their protocol's types, the errors), plus the public modules ``idempo.asgi``, ``idempo.wsgi``,
``idempo.django``, ``idempo.flask``, ``idempo.decorators``, ``idempo.transactions``, ``idempo.stores``,
``idempo.client``, ``idempo.observe``, ``idempo.metrics``, ``idempo.testing`` and ``idempo.proxy``.
Everything in a module whose name starts with ``_`` is private, the sans-I/O decision table (``idempo._core``)
included: it is how idempo is built, described for contributors in docs/DESIGN-NOTES.md.
"""

from __future__ import annotations

from typing import Any

from ._core.errors import (
    BodyTooLargeError,
    ConfigurationError,
    IdempoError,
    InProgressError,
    InvalidKeyError,
    KeyReuseError,
    KeyTakenOverError,
    MissingDependency,
    MissingKeyError,
    NotClaimedError,
    OutcomeUnknownError,
    RequestError,
    ResponseNotStoredError,
    StoreError,
    StoreFullError,
    TransactionError,
    WrongDatabaseError,
)
from ._core.fingerprint import canonical_json_body, fingerprint_request
from ._core.outcome import mark_outcome_unknown
from ._core.policy import Policy
from ._core.records import Acquired, Claim, Existing, Record, State
from .asgi import IdempotencyMiddleware, authorization_principal, default_principal
from .decorators import idempotent
from .observe import Observer
from .stores import Store, SyncStore, store_from_url, sync_store_from_url
from .stores.memory import MemoryStore
from .stores.sqlite import SQLiteStore

__all__ = [
    "Acquired",
    "BodyTooLargeError",
    "Claim",
    "ConfigurationError",
    "Existing",
    "IdempoError",
    "IdempotencyMiddleware",
    "InProgressError",
    "InvalidKeyError",
    "KeyReuseError",
    "KeyTakenOverError",
    "MemoryStore",
    "MissingDependency",
    "MissingKeyError",
    "NotClaimedError",
    "Observer",
    "OutcomeUnknownError",
    "Policy",
    "Record",
    "RequestError",
    "ResponseNotStoredError",
    "SQLiteStore",
    "State",
    "Store",
    "StoreError",
    "StoreFullError",
    "SyncStore",
    "TransactionError",
    "WrongDatabaseError",
    "authorization_principal",
    "canonical_json_body",
    "default_principal",
    "fingerprint_request",
    "idempotent",
    "mark_outcome_unknown",
    "store_from_url",
    "sync_store_from_url",
]

# Every public name says it is idempo's (as httpx does): its home in a private module is no one's business, and help(),
# reprs and the API reference show idempo.Policy, not idempo._core.policy.Policy.
for _name in __all__:
    _exported = globals()[_name]
    if getattr(_exported, "__module__", "idempo").startswith("idempo."):  # not Claim, a union of two that are
        _exported.__module__ = "idempo"
del _name, _exported


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("idempo")
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
