"""``memory://``: records in a dict of this process. For tests, development and single-process services.

Theory of operation. The store is bounded twice, by records (``max_entries``) and by bytes (``max_bytes``, counted
as below), and it never drops a record that is still live to make room: a dropped completed record would let its
retry run the operation a second time, and a dropped claim would let a retry run it while it is still running. So a
full store drops what has expired and, if that is not enough, *refuses*, as Redis does at ``maxmemory`` under
``noeviction``:

- a claim of a new key, once the store holds ``max_entries`` records or would hold more than 7/8 of ``max_bytes``,
  raises :class:`~idempo.StoreFullError` (the middleware answers 503 with ``Retry-After``): nothing has run yet,
  and the client retries later;
- a completion always lands if its payload is at most ``_RESULT_ROOM`` bytes (every claim is counted as if it held
  that much already, so the middleware's "response not stored" marker always fits), and a larger one lands as long
  as the store stays within ``max_bytes``; the last eighth is kept for them. A larger one that does not fit raises
  ``StoreFullError``, and the middleware records that marker instead: a retry gets 410, not a second run.

One caller's flood therefore costs other callers new keys for a while (503s, until records expire), never records
they already have. Expired records are dropped as they are met, and all at once when the store is full (at most once
a second, so that a flood of refused claims cannot make every request walk the whole dict).

Bytes are counted per record as the lengths of its key, fingerprint and payload plus ``_RECORD_BYTES``, a little
more than what CPython needs around them, so that the count is what the process holds, give or take a tenth (plus
the dict's spare slots).

A memory store serves one process. It refuses new keys (``StoreError``) when it finds itself in one of several
workers of a server (see ``_workers``), unless built with ``single_process_check=False``.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final, Self

from .._core.errors import ConfigurationError, StoreError, StoreFullError
from .._core.records import Acquired, Claim, Existing, Record, State, new_token
from ._scan import check_limit
from ._url import StoreURL
from ._workers import other_workers

__all__ = ["MemoryStore", "SyncMemoryStore"]

logger = logging.getLogger("idempo")

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
_PAYLOAD: Final = 7
_COMPLETED: Final = State.COMPLETED
_new_record = tuple.__new__  # builds a named tuple without its Python-level __new__

MAX_ENTRIES: Final = 100_000
MAX_BYTES: Final = 64 * 1024 * 1024
_MIN_BYTES: Final = 64 * 1024
# CPython's own bytes per record beside its key, fingerprint and payload: the tuple, three floats, the token, the dict
# slot and the objects' headers (measured with tracemalloc on CPython 3.11, 64-bit: 340-380).
_RECORD_BYTES: Final = 384
_RESULT_ROOM: Final = 256  # payload bytes counted for every claim, so that a small result always lands
_CLAIM_BYTES: Final = _RECORD_BYTES + _RESULT_ROOM
_SWEEP_EVERY: Final = 1.0  # seconds of the store's clock between two sweeps of a full store
_RECHECK_EVERY: Final = 1.0  # seconds between two looks for other workers, while they are there


def _as_record(entry: _Entry) -> Record:
    return entry if type(entry) is Record else _new_record(Record, entry)


def _charge(entry: _Entry) -> int:
    """The bytes a record counts for."""
    payload = entry[_PAYLOAD]
    return (
        _RECORD_BYTES + len(entry[0]) + len(entry[_FINGERPRINT]) + (_RESULT_ROOM if payload is None else len(payload))
    )


def _mib(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MiB"


class SyncMemoryStore:
    """A bounded, expiring store in this process's memory: the blocking twin of :class:`MemoryStore`, whose
    ``sync()`` returns one over the same records. The same bounds, refusals and arguments as :class:`MemoryStore`.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
        single_process_check: bool = True,
    ) -> None:
        if max_entries < 1:
            msg = f"max_entries must be at least 1, not {max_entries}"
            raise ConfigurationError(msg)
        if max_bytes < _MIN_BYTES:
            msg = f"max_bytes must be at least {_MIN_BYTES} (64 KiB), not {max_bytes}"
            raise ConfigurationError(msg)
        self._records: dict[str, _Entry] = {}
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._claim_limit = max_bytes - max_bytes // 8
        self._bytes = 0
        self._next_sweep = float("-inf")
        self._clock = clock
        # The sync decorator may call from several threads; the lock costs ~0.1 µs uncontended.
        self._lock = threading.Lock()
        # The check runs at this store's first claim in each process (again in a forked child), then only while it
        # finds other workers, at most once a second.
        self._check_due = single_process_check
        self._recheck_at = float("-inf")
        self._refusal = ""
        if single_process_check:
            _CHECKED.add(self)

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``memory://[?max_entries=N][&max_bytes=N][&single_process_check=false]`` (a new, empty
        store)."""
        return cls(**_url_options(url, options))

    def __repr__(self) -> str:
        return f"SyncMemoryStore(max_entries={self._max_entries}, max_bytes={self._max_bytes})"

    @property
    def bytes_used(self) -> int:
        """The bytes this store counts for its records now (see ``max_bytes``)."""
        return self._bytes

    def _live(self, key: str, now: float) -> _Entry | None:
        record = self._records.get(key)
        if record is None:
            return None
        if record[_EXPIRES_AT] <= now:
            del self._records[key]
            self._bytes -= _charge(record)
            return None
        return record

    def _sweep(self, now: float, what: str) -> None:
        """Drop every expired record, to make room for *what*; raise :class:`StoreFullError` if there was none
        (or the last sweep was less than a second ago)."""
        records = self._records
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY
            expired = [key for key, record in records.items() if record[_EXPIRES_AT] <= now]
            for key in expired:
                self._bytes -= _charge(records.pop(key))
            if expired:
                return
        msg = (
            f"memory store full: {what} does not fit beside its {len(records)} live records "
            f"({_mib(self._bytes)} counted; max_entries={self._max_entries}, max_bytes={_mib(self._max_bytes)}, "
            f"new keys up to {_mib(self._claim_limit)}); retry once records expire, or give the store more room"
        )
        raise StoreFullError(msg)

    def _check_workers(self) -> None:
        """Raise :class:`StoreError` while this process is one of several workers of a server."""
        now = time.monotonic()
        if now >= self._recheck_at:
            others = other_workers()
            if not others:
                if self._refusal:
                    logger.warning("idempo: memory store: no other worker is left; new keys are accepted again")
                self._check_due = False
                self._refusal = ""
                return
            self._recheck_at = now + _RECHECK_EVERY
            refusal = (
                f"memory store refuses new keys: process {os.getpid()} is one of several workers of a server (its "
                f"listening socket is shared with pid{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}), "
                "and records kept in one worker's memory are invisible to the others, so a retry that reached "
                "another worker would run the operation again. Use a store the workers share (sqlite:///, "
                "redis://, postgresql://), run one worker, or pass single_process_check=False if these processes "
                "never see the same keys"
            )
            if refusal != self._refusal:
                logger.error("idempo: %s", refusal)
            self._refusal = refusal
        raise StoreError(self._refusal)

    def _forked(self) -> None:
        # A lock another thread of the parent held at the fork would never be released in the child.
        self._lock = threading.Lock()
        self._check_due = True
        self._recheck_at = float("-inf")

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`. *token*, if given, is the new owner's fencing token (drawn by the
        caller, e.g. so that it can release a claim whose reply it never got), else the store draws one.

        Raises:
            StoreFullError: the store is full of live records.
            StoreError: this process is one of several workers of a server.
        """
        if self._check_due:
            self._check_workers()
        # A replay's read, without the lock: a completed record changes only by expiring or being deleted, and
        # one dict read sees a whole entry (entries are tuples, replaced whole), under the GIL as without it.
        record = self._records.get(key)
        if record is not None and record[_STATE] is _COMPLETED and record[_EXPIRES_AT] > self._clock():
            return Existing(_as_record(record))
        with self._lock:
            now = self._clock()
            records = self._records
            record = records.get(key)
            if record is not None and record[_EXPIRES_AT] <= now:
                del records[key]
                self._bytes -= _charge(record)
                record = None
            if record is None:
                charge = _CLAIM_BYTES + len(key) + len(fingerprint)
                used = self._bytes + charge
                while used > self._claim_limit or len(records) >= self._max_entries:
                    self._sweep(now, "a new key")
                    used = self._bytes + charge
            elif record[_STATE] is State.COMPLETED or record[_LEASE_EXPIRES_AT] > now:
                return Existing(_as_record(record))
            else:  # an in-progress record whose lease ran out is stale: its owner died or hung; we take it over
                used = self._take_over(record, fingerprint, now)
            self._bytes = used
            if token is None:
                token = new_token()
            records[key] = (key, State.IN_PROGRESS, fingerprint, token, now, now + lease, now + ttl, None)
            return Acquired(token)

    def _take_over(self, stale: _Entry, fingerprint: str, now: float) -> int:
        """Make room for a claim that takes over *stale* in its place; return the bytes counted then (no more than
        now unless its fingerprint is longer: it is no new record)."""
        charge = _CLAIM_BYTES + len(stale[0]) + len(fingerprint) - _charge(stale)
        while charge > 0 and self._bytes + charge > self._claim_limit:
            self._sweep(now, "a new key")
        return self._bytes + charge

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
        """See :meth:`idempo.Store.complete`.

        Raises:
            StoreFullError: *payload* is over 256 bytes and does not fit in ``max_bytes`` (the claim stays as it
                was: complete it with a smaller payload, or release it).
        """
        with self._lock:
            now = self._clock()
            record = self._owned(key, token, now)
            if record is None:
                return False
            growth = len(payload) - _RESULT_ROOM
            used = self._bytes + growth
            while used > self._max_bytes:
                self._sweep(now, f"a result of {len(payload)} bytes")
                used = self._bytes + growth
            self._bytes = used
            # Completed records are built as what claim hands out: a replay then finds its Record ready.
            self._records[key] = _new_record(
                Record, (key, State.COMPLETED, record[_FINGERPRINT], "", record[_CREATED_AT], now, now + ttl, payload)
            )
            return True

    def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        with self._lock:
            record = self._owned(key, token, self._clock())
            if record is None:
                return False
            del self._records[key]
            self._bytes -= _charge(record)
            return True

    def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        with self._lock:
            record = self._live(key, self._clock())
            return None if record is None else _as_record(record)

    def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        with self._lock:
            record = self._records.pop(key, None)
            if record is None:
                return False
            self._bytes -= _charge(record)
            return True

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
            self._bytes = 0


# The stores that check for other workers, told when the process forks: a pre-forking server (gunicorn --preload)
# makes its workers from a process that made the store, and each of them must look again.
_CHECKED: weakref.WeakSet[SyncMemoryStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_CHECKED):
        store._forked()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _url_options(url: StoreURL, options: dict[str, Any]) -> dict[str, Any]:
    """The constructor's options from ``memory://`` query options; keyword *options* win."""
    options.setdefault("max_entries", url.int_option("max_entries", MAX_ENTRIES))
    options.setdefault("max_bytes", url.int_option("max_bytes", MAX_BYTES))
    options.setdefault("single_process_check", url.bool_option("single_process_check", True))
    return options


class MemoryStore:
    """A bounded, expiring store in this process's memory.

    Records live only as long as the process and are invisible to other processes: use it for tests, for
    development, and for a service that runs as exactly one process. It never drops a live record to make room
    (that would let a retry run the operation again): when full, it drops expired records, and if that is not
    enough it refuses new keys with :class:`~idempo.StoreFullError` (the middleware's 503) until records expire.
    Claims stop at 7/8 of ``max_bytes``; the rest is kept for the results of the operations already running. A
    result over 256 bytes that still does not fit is refused too (``StoreFullError`` from ``complete``; the claim
    stays, and the middleware and the decorator complete it with their few-byte "not stored" marker instead),
    while a smaller one always lands: the room for it was counted at the claim.
    Nothing here waits, so each operation runs inline, as its :meth:`sync` twin's (but for the look for other
    workers at the first claim: a few milliseconds of ``/proc`` reads).

    Args:
        max_entries: the most records kept at once.
        max_bytes: the most bytes kept at once, counting each record as its key, fingerprint and payload plus
            384 bytes (at least 64 KiB).
        clock: seconds since the epoch; pass a fake clock to test expiry without waiting.
        single_process_check: refuse new keys while this process is one of several workers of a server (siblings
            that accept connections on the same listening socket, seen through Linux's ``/proc``): their records
            would not be shared, so a retry that reached another worker would run again. Checked at the store's
            first claim in each process, then again at most once a second while other workers are there. ``False``
            turns the check off, for processes that really never see the same keys.

    Raises:
        ConfigurationError: ``max_entries`` below 1, or ``max_bytes`` below 64 KiB.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
        single_process_check: bool = True,
    ) -> None:
        self._sync = SyncMemoryStore(
            max_entries=max_entries, max_bytes=max_bytes, clock=clock, single_process_check=single_process_check
        )
        self._records = self._sync._records  # the same dict

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> Self:
        """Build from ``memory://[?max_entries=N][&max_bytes=N][&single_process_check=false]``."""
        return cls(**_url_options(url, options))

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self._sync._max_entries}, max_bytes={self._sync._max_bytes})"

    @property
    def bytes_used(self) -> int:
        """The bytes this store counts for its records now (see ``max_bytes``)."""
        return self._sync._bytes

    def sync(self) -> SyncMemoryStore:
        """The blocking twin of this store, over the same records (for the decorator on sync functions)."""
        return self._sync

    # The twin's operations, called here: nothing in them waits. Not a ForwardingStore's single _forward: that hop
    # costs half a microsecond a call, measured as a tenth of a replay (a memory store's calls take one or two).

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`SyncMemoryStore.claim`."""
        return self._sync.claim(key, fingerprint, lease=lease, ttl=ttl, token=token)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        return self._sync.renew(key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`SyncMemoryStore.complete`."""
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

    async def close(self) -> None:
        """Forget every record."""
        self._sync.close()

    async def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """See :meth:`idempo.stores.ScanningStore.scan`. Yields in key order."""
        for record in self._sync.scan(prefix, limit=limit):
            yield record
