"""What a store keeps per key, and what ``claim`` answers. Plain data, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Acquired", "Claim", "Existing", "Record", "State"]


class State(enum.Enum):
    """The two states of a record. An absent or expired record is simply not there."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a store: what happened, or is happening, under one key.

    Attributes:
        key: the store key (the middleware's is ``<principal digest>:<Idempotency-Key>``).
        state: ``IN_PROGRESS`` while an owner runs the operation, ``COMPLETED`` once its result is stored.
        fingerprint: the digest of the request that first claimed the key.
        token: the fencing token of the current owner (``IN_PROGRESS``); ``""`` once completed.
        created_at: when the key was claimed, in seconds since the epoch.
        lease_expires_at: until when the owner's claim is honoured without a renewal (``IN_PROGRESS``).
        expires_at: when the record disappears.
        payload: the stored result (``COMPLETED``), opaque bytes; ``None`` while in progress.
    """

    key: str
    state: State
    fingerprint: str
    token: str
    created_at: float
    lease_expires_at: float
    expires_at: float
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Acquired:
    """``claim`` took the key: the caller now owns it and must ``complete`` or ``release`` it with ``token``."""

    token: str


@dataclass(frozen=True, slots=True)
class Existing:
    """``claim`` found a live record under the key; the core decides what that means (``decide``)."""

    record: Record


Claim = Acquired | Existing
"""What ``Store.claim`` returns."""
