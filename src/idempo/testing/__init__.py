"""A conformance suite for :class:`idempo.Store` implementations.

Subclass :class:`StoreConformance` in one of your pytest files, tell it how to open your store, and pytest runs
every scenario of the store contract against it: claims and their races, fencing tokens, leases and their
takeover, expiry, replay of payloads byte for byte. idempo runs the same suite against each of its own stores.

The scenarios live in private modules, one per group (``_claims``, ``_completion``, ``_leases``, ``_expiry``,
``_operations``, ``_scan``), on what ``_base`` gives them; :class:`StoreConformance` is all of them at once.
"""

from __future__ import annotations

import asyncio

from ..stores import Store, SyncStore
from ._claims import ClaimScenarios
from ._completion import CompletionScenarios
from ._expiry import ExpiryScenarios
from ._leases import LeaseScenarios
from ._operations import OperationScenarios
from ._scan import ScanScenarios
from ._threaded import threaded

__all__ = ["StoreConformance", "SyncStoreConformance"]


# pytest collects what a class inherits base by base, the last of its bases first: the groups are listed last to
# first so that the scenarios run in the order the docstring tells them (claims first, scan last).
class StoreConformance(
    ScanScenarios,
    OperationScenarios,
    ExpiryScenarios,
    LeaseScenarios,
    CompletionScenarios,
    ClaimScenarios,
):
    """The behaviour every :class:`idempo.Store` must have, as a pytest test class to subclass.

    Subclass it in a test module, under a name pytest collects (``Test...``), and implement :meth:`open_store`.
    Every test method is a plain synchronous pytest test (no pytest-asyncio needed): it runs its scenario with
    ``asyncio.run``, opening a fresh store inside that event loop and closing it afterwards with
    :meth:`close_store`. Each scenario uses fresh random keys (see :meth:`new_key`) and never flushes anything,
    so the suite can run against a shared server; the records it leaves expire within :attr:`long_ttl`::

        # tests/test_my_store.py
        from idempo import Store
        from idempo.testing import StoreConformance

        from my_app.stores import DynamoDBStore


        class TestDynamoDBStore(StoreConformance):
            short_lease = 0.5  # a slower backend may widen the timing constants
            expiry_margin = 0.5

            async def open_store(self) -> Store:
                return DynamoDBStore(table="idempo-test")

    To leave a scenario out, override it, e.g. with ``@pytest.mark.skip(reason=...)`` on a method of the same
    name. Scenarios that test expiry really wait: they use leases and TTLs of :attr:`short_lease` and
    :attr:`short_ttl` seconds and sleep :attr:`expiry_margin` past them. Checks that a claim is *still* held
    use :attr:`long_lease`, so a slow machine cannot make them flaky.

    The ``test_scan_*`` scenarios check the optional ``scan`` capability (:class:`idempo.stores.ScanningStore`):
    prefixes taken literally, expired records absent, limits. They are skipped for a store without it.

    Attributes:
        short_lease: seconds of a lease the suite waits out to test takeover.
        short_ttl: seconds of a TTL the suite waits out to test expiry.
        expiry_margin: how long past a short lease or TTL the suite sleeps before it expects it to be over.
            Widen it for a store whose clock is another machine's, or whose expiry is coarse.
        long_lease: seconds of a lease that must not run out during a scenario.
        long_ttl: seconds of a TTL that must not run out during a scenario.
        concurrency: how many claims race on one key.
        large_payload_size: bytes of the large payload that must round-trip unchanged.
        clock_tolerance: how far the store's timestamps may be from this machine's clock, in seconds.
        expires_on_its_own: ``True`` for a store whose backend drops expired records by itself (Redis TTLs,
            DynamoDB TTL); its ``purge_expired`` may then return 0 even when records expired.
    """


class SyncStoreConformance(StoreConformance):
    """The same suite, for a :class:`~idempo.stores.SyncStore`: implement :meth:`open_sync_store` instead of
    ``open_store``. Every operation of a scenario runs in a thread of its own, so the races are real threads racing
    on your store::

        class TestMySyncStore(SyncStoreConformance):
            def open_sync_store(self) -> SyncStore:
                return MySyncStore(...)
    """

    def open_sync_store(self) -> SyncStore:
        """Open the sync store under test (called in a worker thread of each test)."""
        msg = f"{type(self).__name__} must implement `def open_sync_store(self) -> SyncStore`"
        raise NotImplementedError(msg)

    async def open_store(self) -> Store:
        """The store :meth:`open_sync_store` opens, seen through worker threads."""
        return threaded(await asyncio.to_thread(self.open_sync_store))
