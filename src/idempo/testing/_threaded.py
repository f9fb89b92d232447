"""The conformance suite's view of a :class:`~idempo.stores.SyncStore`: an async store whose every operation runs
in a worker thread, so that the suite's concurrent scenarios race real threads on the sync store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .._core.records import Record
from ..stores import Store, SyncScanningStore, SyncStore
from ..stores._forwarding import ForwardingStore, Operation


class _ThreadedStore(ForwardingStore):
    """A :class:`Store` over a :class:`SyncStore`: each operation runs in a worker thread, so the suite's
    concurrent scenarios (50 racing claims) exercise the sync store from many threads at once. Strictly private."""

    _inner: SyncStore

    @property
    def sync(self) -> SyncStore:
        """The sync store under test, as ``open_sync_store`` returned it (a ``close_store`` override may want it)."""
        return self._inner

    async def _forward(self, operation: Operation, /, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self._inner, operation), *args, **kwargs)


class _ThreadedScanningStore(_ThreadedStore):
    """A :class:`_ThreadedStore` over a :class:`SyncScanningStore`: each step of a scan runs in a worker thread.
    Strictly private."""

    _inner: SyncScanningStore

    async def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        records: Iterator[Record] = await asyncio.to_thread(self._inner.scan, prefix, limit=limit)
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
