"""What a store keeps per key, and what ``claim`` answers. Plain data, no I/O."""

from __future__ import annotations

import enum
import os
import random
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Acquired", "Claim", "Existing", "Record", "State", "new_token"]


class State(enum.Enum):
    """The two states of a record. An absent or expired record is simply not there."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class Record(NamedTuple):
    """One record of a store: what happened, or is happening, under one key. Immutable.

    A named tuple rather than a frozen dataclass: stores build one or two per request, and a frozen dataclass
    of eight fields costs six times as much to build.

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


# Fencing tokens only need to be unique, never secret (they do not leave the server), so a private generator
# seeded from os.urandom is enough, and twice as fast as secrets.token_hex. Private, so that a program that seeds
# the global `random` (tests often do) cannot make two processes draw the same tokens; reseeded in a forked child.
_tokens = random.Random()
os.register_at_fork(after_in_child=_tokens.seed)
_getrandbits = _tokens.getrandbits  # the same generator after a reseed


def new_token() -> str:
    """A fresh fencing token: 128 random bits as 32 hex characters."""
    return _getrandbits(128).to_bytes(16, "little").hex()  # what randbytes(16) does, without its Python frame
