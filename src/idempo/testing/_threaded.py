"""The conformance suite's view of a :class:`~idempo.stores.SyncStore`: an async store whose every operation runs
in a worker thread, so that the suite's concurrent scenarios race real threads on the sync store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from .._core.records import Claim, Record
from ..stores import Store, SyncScanningStore, SyncStore


class _ThreadedStore:
    """A :class:`Store` over a :class:`SyncStore`: each operation runs in a worker thread, so the suite's
    concurrent scenarios (50 racing claims) exercise the sync store from many threads at once. Strictly private."""

    def __init__(self, sync: SyncStore) -> None:
        self.sync = sync

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        if token is None:
            return await asyncio.to_thread(self.sync.claim, key, fingerprint, lease=lease, ttl=ttl)
        return await asyncio.to_thread(self.sync.claim, key, fingerprint, lease=lease, ttl=ttl, token=token)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        return await asyncio.to_thread(self.sync.renew, key, token, lease=lease)

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return await asyncio.to_thread(self.sync.complete, key, token, payload, ttl=ttl)

    async def release(self, key: str, token: str) -> bool:
        return await asyncio.to_thread(self.sync.release, key, token)

    async def get(self, key: str) -> Record | None:
        return await asyncio.to_thread(self.sync.get, key)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self.sync.delete, key)

    async def purge_expired(self) -> int:
        return await asyncio.to_thread(self.sync.purge_expired)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)


class _ThreadedScanningStore(_ThreadedStore):
    """A :class:`_ThreadedStore` over a :class:`SyncScanningStore`: each step of a scan runs in a worker thread.
    Strictly private."""

    sync: SyncScanningStore

    async def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        records: Iterator[Record] = await asyncio.to_thread(self.sync.scan, prefix, limit=limit)
        try:
            while (record := await asyncio.to_thread(next, records, None)) is not None:
                yield record
        finally:
            close = getattr(records, "close", None)
            if close is not None:
                await asyncio.to_thread(close)


def threaded(sync: SyncStore) -> Store:
    """*sync* as an async store, each operation in a worker thread; with ``scan`` if *sync* has it."""
    return _ThreadedScanningStore(sync) if isinstance(sync, SyncScanningStore) else _ThreadedStore(sync)
