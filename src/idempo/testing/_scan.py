"""The scenarios of the optional ``scan`` capability (:class:`idempo.stores.ScanningStore`): prefixes taken
literally, expired records absent, limits. Each is skipped for a store without it."""

from __future__ import annotations

from .._core.records import Record
from ..stores import ScanningStore, Store
from ._base import ConformanceBase, _acquired, _fingerprint, _require, _scan_scenario


class ScanScenarios(ConformanceBase):
    """The optional ``scan``: skipped for a store that is not a ``ScanningStore``."""

    async def _scan(self, store: ScanningStore, prefix: str, limit: int | None = None) -> dict[str, Record]:
        """What ``scan`` yields, by key; fails on a record outside *prefix* or listed twice."""
        __tracebackhide__ = True
        found: dict[str, Record] = {}
        async for record in store.scan(prefix, limit=limit):
            what = f"scan({prefix!r}, limit={limit})"
            _require(isinstance(record, Record), f"{what} yielded {record!r}, not a Record")
            _require(record.key.startswith(prefix), f"{what} yielded {record.key!r}, outside the prefix")
            _require(record.key not in found, f"{what} yielded {record.key!r} twice")
            found[record.key] = record
        return found

    @_scan_scenario
    async def test_scan_lists_in_progress_and_completed_records(self, store: ScanningStore) -> None:
        """``scan(prefix)`` yields every live record whose key starts with *prefix*, in progress or completed, with
        all its fields, and no other."""
        base = self.new_key()
        running, done = base + ":running", base + ":done"
        running_fp, done_fp = _fingerprint(), _fingerprint()
        token = await self._claim(store, running, running_fp)
        done_token = await self._claim(store, done, done_fp)
        _require(await store.complete(done, done_token, b"result", ttl=self.long_ttl), "complete returned False")
        neighbours = [self.new_key(), base[:-1], base[:-1] + chr(ord(base[-1]) + 1), base.upper()]
        for key in neighbours:
            await self._claim(store, key, _fingerprint())
        for prefix in (base, base + ":"):
            found = await self._scan(store, prefix)
            _require(set(found) == {running, done}, f"scan({prefix!r}) listed {sorted(found)}")
            self._check_in_progress(found[running], running, running_fp, token, "the in-progress record scanned")
            self._check_completed(found[done], done, done_fp, b"result", "the completed record scanned")
        found = await self._scan(store, done)
        _require(set(found) == {done}, f"scan of a whole key listed {sorted(found)}")
        _require(await self._scan(store, base + ":x") == {}, "scan of a prefix nothing has listed records")
        released = await self._claim(store, base + ":released", _fingerprint())
        _require(await store.release(base + ":released", released), "release returned False")
        _require(await store.delete(running), "delete returned False")
        found = await self._scan(store, base)
        _require(set(found) == {done}, f"scan after a release and a delete listed {sorted(found)}")

    @_scan_scenario
    async def test_scan_skips_expired_records(self, store: ScanningStore) -> None:
        """Records past their TTL are absent from a scan; a stale claim (lease run out, TTL not) is listed."""
        base = self.new_key()
        live_done, stale = base + ":live-done", base + ":stale"
        expired_done, expired_running = base + ":expired-done", base + ":expired-running"
        await self._completed_as(store, live_done, self.long_ttl)
        await self._completed_as(store, expired_done, self.short_ttl)
        claim = await store.claim(expired_running, _fingerprint(), lease=self.long_lease, ttl=self.short_ttl)
        _acquired(claim, "claim of a fresh key")
        stale_fp = _fingerprint()
        stale_token = await self._claim(store, stale, stale_fp, lease=self.short_lease)
        await self._wait_past(max(self.short_ttl, self.short_lease))
        found = await self._scan(store, base)
        _require(set(found) == {live_done, stale}, f"scan after expiry listed {sorted(found)}")
        self._check_in_progress(found[stale], stale, stale_fp, stale_token, "a stale claim scanned")

    async def _completed_as(self, store: Store, key: str, ttl: float) -> None:
        token = await self._claim(store, key, _fingerprint())
        _require(await store.complete(key, token, b"done", ttl=ttl), "complete by the owner returned False")

    @_scan_scenario
    async def test_scan_limit(self, store: ScanningStore) -> None:
        """``limit`` caps the number of records, each listed once; ``None`` lists all; a negative one is a
        ``ValueError``."""
        base = self.new_key()
        keys = {f"{base}:{i:02d}" for i in range(7)}
        for key in keys:
            await self._claim(store, key, _fingerprint())
        _require(set(await self._scan(store, base)) == keys, "scan without a limit missed records")
        for limit in (0, 1, 3, 7, 8, 100):
            found = await self._scan(store, base, limit)
            _require(len(found) == min(limit, len(keys)), f"scan with limit={limit} listed {len(found)} records")
            _require(set(found) <= keys, f"scan with limit={limit} listed {sorted(set(found) - keys)}")
        everything = await self._scan(store, "", 2)
        _require(len(everything) <= 2, f"scan('', limit=2) listed {len(everything)} records")
        try:
            await self._scan(store, base, -1)
        except ValueError:
            pass
        else:
            raise AssertionError("scan with limit=-1 did not raise ValueError")

    @_scan_scenario
    async def test_scan_prefix_is_literal(self, store: ScanningStore) -> None:
        """Pattern characters in a prefix (``* ? [ ] % _ \\ !``) match only themselves, whatever the backend's
        pattern language (Redis ``MATCH``, SQL ``LIKE``)."""
        base = self.new_key()
        specials = ["*", "?", "[", "]", "[ab]", "[!a]", "%", "_", "\\", "!", "^", "-", "{tag}", "'", "."]
        plain = ["a", "b", "Z", "", "ab]"]
        keys = {base + middle + "x" for middle in specials + plain}
        for key in keys:
            await self._claim(store, key, _fingerprint())
        for middle in specials:
            prefix = base + middle
            expected = {key for key in keys if key.startswith(prefix)}
            found = await self._scan(store, prefix)
            _require(set(found) == expected, f"scan({prefix!r}) listed {sorted(found)}, expected {sorted(expected)}")
        _require(set(await self._scan(store, base)) == keys, "scan of the common prefix missed records")
