"""The lease scenarios: renewal, a stale claim taken over (once, however many race for it), the old owner fenced
off, a stale owner nobody took over still finishing, a completed record past its lease."""

from __future__ import annotations

import asyncio
import time

from .._core.records import Acquired, Existing
from ..stores import Store
from ._base import ConformanceBase, _existing, _fingerprint, _present, _require, _same_payload, _scenario


class LeaseScenarios(ConformanceBase):
    """Leases, and the takeover of a claim whose lease ran out."""

    @_scenario
    async def test_renew_extends_lease(self, store: Store) -> None:
        """After ``renew`` with a long lease, the claim outlives its first, short lease."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint, lease=self.short_lease)
        _require(await store.renew(key, token, lease=self.long_lease), "renew by the owner returned False")
        await self._wait_past(self.short_lease)
        record = _existing(await store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.long_ttl), "claim")
        self._check_in_progress(record, key, fingerprint, token, "claim after the first lease ran out")
        left = record.lease_expires_at - time.time()
        _require(left > self.long_lease / 2 - self.clock_tolerance, f"the renewed lease ends in {left} s")

    @_scenario
    async def test_stale_claim_is_taken_over(self, store: Store) -> None:
        """Once the lease runs out, ``get`` still shows the record, and a claim takes it with a new token."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint, lease=self.short_lease)
        await self._wait_past(self.short_lease)
        record = _present(await store.get(key), "get of a stale (lease run out, not expired) record")
        self._check_in_progress(record, key, fingerprint, token, "get of a stale record")
        new_fingerprint = _fingerprint()
        new_token = await self._claim(store, key, new_fingerprint)
        _require(new_token != token, "the takeover got the stale owner's token")
        record = _present(await store.get(key), "get after a takeover")
        self._check_in_progress(record, key, new_fingerprint, new_token, "get after a takeover")

    @_scenario
    async def test_taken_over_owner_is_fenced(self, store: Store) -> None:
        """The owner whose key was taken over can no longer renew, complete or release it."""
        key = self.new_key()
        old = await self._claim(store, key, _fingerprint(), lease=self.short_lease)
        await self._wait_past(self.short_lease)
        new = await self._claim(store, key, _fingerprint())
        before = await store.get(key)
        _require(not await store.renew(key, old, lease=self.long_lease), "the old owner renewed a taken-over key")
        _require(not await store.complete(key, old, b"stale", ttl=self.long_ttl), "the old owner completed it")
        _require(not await store.release(key, old), "the old owner released a taken-over key")
        _require(await store.get(key) == before, "the old owner's refused operations changed the new owner's record")
        _require(await store.complete(key, new, b"fresh", ttl=self.long_ttl), "the new owner's complete returned False")
        _require(not await store.complete(key, old, b"stale", ttl=self.long_ttl), "the old owner overwrote the result")
        record = _existing(await store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.long_ttl), "claim")
        _same_payload(record.payload, b"fresh", "the result after a takeover")

    @_scenario
    async def test_concurrent_takeover_has_one_winner(self, store: Store) -> None:
        """Many claims racing on a stale key: exactly one takes it over."""
        key = self.new_key()
        old = await self._claim(store, key, _fingerprint(), lease=self.short_lease)
        await self._wait_past(self.short_lease)
        fingerprint = _fingerprint()
        claims = await asyncio.gather(
            *(store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl) for _ in range(self.concurrency))
        )
        winners = [claim.token for claim in claims if isinstance(claim, Acquired)]
        _require(len(winners) == 1, f"{len(winners)} of {self.concurrency} racing claims took over a stale key")
        _require(winners[0] != old, "the takeover got the stale owner's token")
        for claim in claims:
            if isinstance(claim, Existing):
                self._check_in_progress(claim.record, key, fingerprint, winners[0], "a losing takeover claim")

    @_scenario
    async def test_stale_owner_can_still_finish(self, store: Store) -> None:
        """An owner whose lease ran out, but whose key nobody took over, can still complete, renew or release."""
        keys = [self.new_key() for _ in range(3)]
        fingerprints = [_fingerprint() for _ in keys]
        tokens = [
            await self._claim(store, k, fp, lease=self.short_lease) for k, fp in zip(keys, fingerprints, strict=True)
        ]
        await self._wait_past(self.short_lease)
        (done, renewed, released), (done_fp, renewed_fp, _) = keys, fingerprints
        _require(await store.complete(done, tokens[0], b"late", ttl=self.long_ttl), "a stale owner's complete failed")
        record = _existing(await store.claim(done, done_fp, lease=self.long_lease, ttl=self.long_ttl), "claim")
        self._check_completed(record, done, done_fp, b"late", "claim after a stale owner completed")
        _require(await store.renew(renewed, tokens[1], lease=self.long_lease), "a stale owner's renew failed")
        record = _existing(await store.claim(renewed, renewed_fp, lease=self.long_lease, ttl=self.long_ttl), "claim")
        self._check_in_progress(record, renewed, renewed_fp, tokens[1], "claim after a stale owner renewed")
        _require(await store.release(released, tokens[2]), "a stale owner's release failed")
        _require(await store.get(released) is None, "get after a stale owner released returned a record")

    @_scenario
    async def test_completed_record_outlives_its_lease(self, store: Store) -> None:
        """The lease matters only while in progress: a completed record is not taken over when it runs out."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint, lease=self.short_lease)
        _require(await store.complete(key, token, b"result", ttl=self.long_ttl), "complete by the owner returned False")
        await self._wait_past(self.short_lease)
        record = _existing(await store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.long_ttl), "claim")
        self._check_completed(record, key, fingerprint, b"result", "claim after the lease of a completed record")
