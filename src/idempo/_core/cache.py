"""A small in-process cache of completed records, so that a replay can be answered without a store round trip.

Completed records never change (a key that completed keeps its response until it expires), so a cached answer is
the answer the store would give, with one exception: a record removed on purpose (``Store.delete``, ``idempo keys
delete``) is still replayed by a process that cached it, until its cache entry runs out.
"""

from __future__ import annotations

__all__ = ["CompletedCache"]


class CompletedCache:
    """At most *max_entries* completed records, each kept at most *ttl* seconds. Strictly private.

    Times are the caller's monotonic clock. When full, the oldest entry makes room.
    """

    __slots__ = ("_entries", "max_entries", "ttl")

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: dict[str, tuple[str, bytes, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> tuple[str, bytes] | None:
        """The fingerprint and payload cached for *key*, or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        fingerprint, payload, until = entry
        if until <= now:
            self._entries.pop(key, None)
            return None
        return fingerprint, payload

    def put(self, key: str, fingerprint: str, payload: bytes, now: float, lifetime: float) -> None:
        """Cache a completed record that the store keeps *lifetime* more seconds."""
        lifetime = min(lifetime, self.ttl)
        if lifetime <= 0:
            return
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            entries.pop(next(iter(entries)), None)
        entries[key] = (fingerprint, payload, now + lifetime)
