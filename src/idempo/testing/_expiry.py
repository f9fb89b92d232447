"""The expiry scenarios: a record, completed or in progress, gone past its TTL, and its key claimable again."""

from __future__ import annotations

from ..stores import Store
from ._base import ConformanceBase, _acquired, _fingerprint, _require, _scenario


class ExpiryScenarios(ConformanceBase):
    """Expiry: the TTL bounds every record."""

    @_scenario
    async def test_completed_record_expires_after_ttl(self, store: Store) -> None:
        """A completed record disappears after the TTL ``complete`` gave it; the key can be claimed again."""
        key = self.new_key()
        token = await self._claim(store, key, _fingerprint())
        _require(
            await store.complete(key, token, b"result", ttl=self.short_ttl), "complete by the owner returned False"
        )
        await self._wait_past(self.short_ttl)
        _require(await store.get(key) is None, "get returned a completed record past its TTL")
        await self._claim(store, key, _fingerprint())

    @_scenario
    async def test_in_progress_record_expires_after_ttl(self, store: Store) -> None:
        """The TTL bounds an in-progress record too: past it, the record is gone and its owner is refused."""
        key = self.new_key()
        claim = await store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.short_ttl)
        token = _acquired(claim, "claim of a fresh key")
        await self._wait_past(self.short_ttl)
        _require(await store.get(key) is None, "get returned an in-progress record past its TTL")
        _require(not await store.renew(key, token, lease=self.long_lease), "renew of an expired record returned True")
        _require(not await store.complete(key, token, b"late", ttl=self.long_ttl), "complete of an expired record")
        _require(not await store.release(key, token), "release of an expired record returned True")
        _require(await store.get(key) is None, "an operation on an expired record brought it back")
        await self._claim(store, key, _fingerprint())
