"""The scenarios of the other operations: ``purge_expired``, ``get`` of an unknown key, ``delete``, ``close``."""

from __future__ import annotations

import asyncio

from ..stores import Store
from ._base import ConformanceBase, _acquired, _fingerprint, _present, _require, _scenario


class OperationScenarios(ConformanceBase):
    """``purge_expired``, ``get``, ``delete`` and ``close``."""

    @_scenario
    async def test_purge_expired_removes_expired_records(self, store: Store) -> None:
        """``purge_expired`` returns a count and removes expired records, and only those.

        Unless :attr:`expires_on_its_own`, it must count at least the two records this scenario let expire
        (so two runs of the suite that purge one store at the same moment may fail this scenario).
        """
        live, live_fp = await self._completed(store, b"live")
        expired_done, expired_running = self.new_key(), self.new_key()
        token = await self._claim(store, expired_done, _fingerprint())
        _require(await store.complete(expired_done, token, b"old", ttl=self.short_ttl), "complete returned False")
        claim = await store.claim(expired_running, _fingerprint(), lease=self.long_lease, ttl=self.short_ttl)
        _acquired(claim, "claim of a fresh key")
        await self._wait_past(self.short_ttl)
        purged = await store.purge_expired()
        _require(type(purged) is int and purged >= 0, f"purge_expired returned {purged!r}, expected an int >= 0")
        if not self.expires_on_its_own:
            _require(purged >= 2, f"purge_expired returned {purged}, but at least 2 records had expired")
        _require(await store.get(expired_done) is None, "an expired completed record survived purge_expired")
        _require(await store.get(expired_running) is None, "an expired in-progress record survived purge_expired")
        record = _present(await store.get(live), "get of a live record after purge_expired")
        self._check_completed(record, live, live_fp, b"live", "a live record after purge_expired")
        again = await store.purge_expired()
        _require(type(again) is int and again >= 0, f"a second purge_expired returned {again!r}")

    # -- get, delete, close -----------------------------------------------------------------------------------

    @_scenario
    async def test_get_unknown_key_returns_none(self, store: Store) -> None:
        """``get`` of a key nobody claimed returns ``None``."""
        _require(await store.get(self.new_key()) is None, "get of an unknown key returned a record")

    @_scenario
    async def test_delete_removes_record(self, store: Store) -> None:
        """``delete`` removes a record whatever its state, returning ``True``; ``False`` when there was none."""
        _require(not await store.delete(self.new_key()), "delete of an unknown key returned True")
        running = self.new_key()
        token = await self._claim(store, running, _fingerprint())
        _require(await store.delete(running), "delete of an in-progress record returned False")
        _require(await store.get(running) is None, "get after delete returned a record")
        _require(not await store.complete(running, token, b"x", ttl=self.long_ttl), "complete after delete")
        _require(await store.get(running) is None, "complete after delete brought the record back")
        await self._claim(store, running, _fingerprint())
        done, _ = await self._completed(store)
        _require(await store.delete(done), "delete of a completed record returned False")
        _require(await store.get(done) is None, "get after delete returned a record")
        _require(not await store.delete(done), "a second delete returned True")
        await self._claim(store, done, _fingerprint())

    def test_close(self) -> None:
        """A store can be closed once without error, whether or not it was used."""

        async def scenario() -> None:
            unused = await self.open_store()
            await self.close_store(unused)
            store = await self.open_store()
            await self._completed(store)
            await self.close_store(store)

        asyncio.run(scenario())
