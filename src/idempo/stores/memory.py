"""``memory://``: records in a dict of this process. For tests, development and single-process services."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final, Self

from .._core.errors import ConfigurationError
from .._core.records import Acquired, Claim, Existing, Record, State, new_token
from ._scan import check_limit
from ._url import StoreURL

__all__ = ["MemoryStore", "SyncMemoryStore"]

# What the store keeps per key: a Record's fields, in a Record (completed records, handed out as they are by
# every replay) or in a plain tuple (claims: most are completed before anyone asks to see them, and a tuple
# costs a fifth of a named tuple to build). `_as_record` makes the Record when one is asked for.
_Entry = tuple[str, State, str, str, float, float, float, bytes | None]
_STATE: Final = 1
_FINGERPRINT: Final = 2
_TOKEN: Final = 3
_CREATED_AT: Final = 4
_LEASE_EXPIRES_AT: Final = 5
_EXPIRES_AT: Final = 6
_new_record = tuple.__new__  # builds a named tuple without its Python-level __new__


def _as_record(entry: _Entry) -> Record:
    return entry if type(entry) is Record else _new_record(Record, entry)


class SyncMemoryStore:
    """A bounded, expiring store in this process's memory: the blocking twin of :class:`MemoryStore`, whose
    ``sync()`` returns one over the same records.

    Records live only as long as the process and are invisible to other processes: use it for tests, for
    development, and for a service that runs as exactly one process. When ``max_entries`` is reached, expired
    records are dropped, then the oldest completed or stale ones (a dropped record means a retry would run
    again); live claims are never dropped.

    Args:
        max_entries: the most records kept at once.
        clock: seconds since the epoch; pass a fake clock to test expiry without waiting.
    """

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            msg = f"max_entries must be at least 1, not {max_entries}"
            raise ConfigurationError(msg)
        self._records: dict[str, _Entry] = {}
        self._max_entries = max_entries
        self._scan_at = max_entries
        self._clock = clock
        # The sync decorator may call from several threads; the lock costs ~0.1 µs uncontended.
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``memory://[?max_entries=N]`` (a new, empty store)."""
        options.setdefault("max_entries", url.int_option("max_entries", 100_000))
        return cls(**options)

    def __repr__(self) -> str:
        return f"SyncMemoryStore(max_entries={self._max_entries})"

    def _live(self, key: str, now: float) -> _Entry | None:
        record = self._records.get(key)
        if record is None:
            return None
        if record[_EXPIRES_AT] <= now:
            del self._records[key]
            return None
        return record

    def _make_room(self, now: float) -> None:
        """Called when the store holds ``_scan_at`` records: drop expired records, then the oldest completed and
        stale ones, down to 90% of ``max_entries``. Records that are live and in progress are never dropped; if
        they alone fill the store, it grows, and the next scan waits until it has grown by a tenth."""
        records = self._records
        for key in [k for k, r in records.items() if r[_EXPIRES_AT] <= now]:
            del records[key]
        excess = len(records) - int(self._max_entries * 0.9)
        if excess > 0:
            droppable = [k for k, r in records.items() if r[_STATE] is State.COMPLETED or r[_LEASE_EXPIRES_AT] <= now]
            for key in droppable[:excess]:
                del records[key]
        self._scan_at = max(self._max_entries, len(records) + max(1, self._max_entries // 10))

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        with self._lock:
            now = self._clock()
            records = self._records
            record = records.get(key)
            if record is not None and record[_EXPIRES_AT] > now:
                # An in-progress record whose lease ran out is stale: its owner died or hung; we take it over.
                if record[_STATE] is State.COMPLETED or record[_LEASE_EXPIRES_AT] > now:
                    return Existing(_as_record(record))
            elif len(records) >= self._scan_at:
                self._make_room(now)
            token = new_token()
            records[key] = (key, State.IN_PROGRESS, fingerprint, token, now, now + lease, now + ttl, None)
            return Acquired(token)

    def _owned(self, key: str, token: str, now: float) -> _Entry | None:
        record = self._records.get(key)
        if record is None or record[_TOKEN] != token or record[_STATE] is not State.IN_PROGRESS:
            return None
        return None if record[_EXPIRES_AT] <= now else record

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        with self._lock:
            now = self._clock()
            record = self._owned(key, token, now)
            if record is None:
                return False
            self._records[key] = (
                key, State.IN_PROGRESS, record[_FINGERPRINT], token, record[_CREATED_AT], now + lease,
                record[_EXPIRES_AT], None,
            )  # fmt: skip
            return True

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        with self._lock:
            now = self._clock()
            record = self._owned(key, token, now)
            if record is None:
                return False
            # Completed records are built as what claim hands out: a replay then finds its Record ready.
            self._records[key] = _new_record(
                Record, (key, State.COMPLETED, record[_FINGERPRINT], "", record[_CREATED_AT], now, now + ttl, payload)
            )
            return True

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        with self._lock:
            if self._owned(key, token, self._clock()) is None:
                return False
            del self._records[key]
            return True

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        with self._lock:
            record = self._live(key, self._clock())
            return None if record is None else _as_record(record)

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        with self._lock:
            return self._records.pop(key, None) is not None

    def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`."""
        with self._lock:
            now = self._clock()
            expired = [key for key in list(self._records) if self._live(key, now) is None]
            return len(expired)

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order, from a copy of the matching
        records taken under the lock when the iteration starts."""
        check_limit(limit)
        with self._lock:
            now = self._clock()
            matching = [
                (key, entry)
                for key, entry in self._records.items()
                if entry[_EXPIRES_AT] > now and key.startswith(prefix)
            ]
        if limit is None:
            matching.sort()
        else:
            matching = heapq.nsmallest(limit, matching)
        for _, entry in matching:
            yield _as_record(entry)

    def close(self) -> None:
        """Forget every record."""
        with self._lock:
            self._records.clear()


class MemoryStore:
    """A bounded, expiring store in this process's memory.

    Records live only as long as the process and are invisible to other processes: use it for tests, for
    development, and for a service that runs as exactly one process. When ``max_entries`` is reached, expired
    records are dropped, then the oldest completed or stale ones (a dropped record means a retry would run
    again); live claims are never dropped. Nothing here waits, so each operation runs inline.

    Args:
        max_entries: the most records kept at once.
        clock: seconds since the epoch; pass a fake clock to test expiry without waiting.
    """

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._sync = SyncMemoryStore(max_entries=max_entries, clock=clock)
        self._records = self._sync._records  # the same dict

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``memory://[?max_entries=N]``."""
        options.setdefault("max_entries", url.int_option("max_entries", 100_000))
        return cls(**options)

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self._sync._max_entries})"

    def sync(self) -> SyncMemoryStore:
        """The blocking twin of this store, over the same records (for the decorator on sync functions)."""
        return self._sync

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        return self._sync.claim(key, fingerprint, lease=lease, ttl=ttl)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return self._sync.renew(key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        return self._sync.complete(key, token, payload, ttl=ttl)

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        return self._sync.release(key, token)

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        return self._sync.get(key)

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        return self._sync.delete(key)

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`."""
        return self._sync.purge_expired()

    async def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order."""
        for record in self._sync.scan(prefix, limit=limit):
            yield record

    async def close(self) -> None:
        """Forget every record."""
        self._sync.close()
