"""What the SQL stores share: how a record's state is written in a row, and how a row becomes a Record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._core.records import Record, State

__all__ = ["COMPLETED", "IN_PROGRESS", "keyed_record_from_row", "record_from_row"]

IN_PROGRESS, COMPLETED = 0, 1
"""The ``state`` column."""


def record_from_row(row: Sequence[Any]) -> Record:
    """A :class:`Record` from ``(key, state, fingerprint, token, created_at, lease_expires_at, expires_at,
    payload)``."""
    return _new_record(Record, (row[0], _COMPLETED if row[1] == COMPLETED else _IN_PROGRESS, *row[2:]))


def keyed_record_from_row(key: str, row: Sequence[Any]) -> Record:
    """The :class:`Record` of *key* from a row of the other columns, ``(state, fingerprint, ..., payload)``."""
    return _new_record(Record, (key, _COMPLETED if row[0] == COMPLETED else _IN_PROGRESS, *row[1:]))


_new_record = tuple.__new__  # builds a Record without its Python-level __new__ (a replay makes one)
_COMPLETED, _IN_PROGRESS = State.COMPLETED, State.IN_PROGRESS
