"""What the SQL stores share: how a record's state is written in a row, and how a row becomes a Record."""

from __future__ import annotations

from typing import Any

from .._core.records import Record, State

__all__ = ["COMPLETED", "IN_PROGRESS", "record_from_row"]

IN_PROGRESS, COMPLETED = 0, 1
"""The ``state`` column."""


def record_from_row(row: tuple[Any, ...]) -> Record:
    """A :class:`Record` from ``(key, state, fingerprint, token, created_at, lease_expires_at, expires_at,
    payload)``."""
    key, state, fingerprint, token, created_at, lease_expires_at, expires_at, payload = row
    return Record(
        key,
        State.COMPLETED if state == COMPLETED else State.IN_PROGRESS,
        fingerprint,
        token,
        created_at,
        lease_expires_at,
        expires_at,
        payload,
    )
