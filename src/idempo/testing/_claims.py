"""The claim scenarios: a fresh key taken, the caller's token, a held key, races on one key and on many, keys
that look alike."""

from __future__ import annotations

import asyncio
import time

from .._core.records import Acquired, Existing, new_token
from ..stores import Store, takes_token
from ._base import ConformanceBase, _acquired, _existing, _fingerprint, _present, _require, _scenario


class ClaimScenarios(ConformanceBase):
    """Claims: who gets a key, and what the others see."""

    @_scenario
    async def test_store_protocol(self, store: Store) -> None:
        """The store satisfies the runtime-checkable ``idempo.Store`` protocol."""
        _require(isinstance(store, Store), f"{type(store).__name__} is not an idempo.Store")

    @_scenario
    async def test_claim_acquires_fresh_key(self, store: Store) -> None:
        """A claim on an unused key acquires it, and ``get`` shows the in-progress record with its times."""
        key, fingerprint = self.new_key(), _fingerprint()
        before = time.time()
        token = await self._claim(store, key, fingerprint)
        record = _present(await store.get(key), "get after a claim")
        self._check_in_progress(record, key, fingerprint, token, "get after a claim")
        tolerance = self.clock_tolerance
        _require(abs(record.created_at - before) <= tolerance, f"created_at {record.created_at} is not now")
        lease = record.lease_expires_at - record.created_at
        _require(abs(lease - self.long_lease) <= tolerance, f"lease_expires_at is {lease} s after created_at")
        ttl = record.expires_at - record.created_at
        _require(abs(ttl - self.long_ttl) <= tolerance, f"expires_at is {ttl} s after created_at")

    @_scenario
    async def test_claim_takes_the_callers_token(self, store: Store) -> None:
        """A claim given ``token=`` makes that the owner's token, on a fresh key and on a stale one taken over, so
        that a caller whose claim timed out can release it. (Skipped for a store whose ``claim`` takes no token.)"""
        if not takes_token(store):
            import pytest

            pytest.skip(
                f"{type(store).__name__}.claim takes no token= (the middleware then cannot release a claim "
                "whose answer it never got)"
            )
        key, fingerprint = self.new_key(), _fingerprint()
        mine = new_token()
        claim = await store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl, token=mine)
        _require(claim == Acquired(mine), f"a claim with token= returned {claim!r}, not Acquired({mine!r})")
        record = _present(await store.get(key), "get after a claim with token=")
        self._check_in_progress(record, key, fingerprint, mine, "get after a claim with token=")
        _require(await store.release(key, mine), "release with the caller's token was refused")
        stale = self.new_key()
        await self._claim(store, stale, fingerprint, lease=self.short_lease)
        await self._wait_past(self.short_lease)
        again = new_token()
        claim = await store.claim(stale, fingerprint, lease=self.long_lease, ttl=self.long_ttl, token=again)
        _require(claim == Acquired(again), f"a takeover with token= returned {claim!r}, not Acquired({again!r})")
        _require(await store.complete(stale, again, b"done", ttl=self.long_ttl), "complete with that token refused")

    @_scenario
    async def test_claim_of_held_key_returns_in_progress_record(self, store: Store) -> None:
        """While the owner holds the key, every further claim returns the owner's in-progress record."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        for attempt in ("second", "third"):
            claim = await store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl)
            record = _existing(claim, f"{attempt} claim of a held key")
            self._check_in_progress(record, key, fingerprint, token, f"{attempt} claim of a held key")

    @_scenario
    async def test_concurrent_claims_have_one_winner(self, store: Store) -> None:
        """Many claims racing on one key: exactly one acquires it; the others see the winner's record."""
        key, fingerprint = self.new_key(), _fingerprint()
        claims = await asyncio.gather(
            *(store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl) for _ in range(self.concurrency))
        )
        winners = [claim for claim in claims if isinstance(claim, Acquired)]
        _require(len(winners) == 1, f"{len(winners)} of {self.concurrency} racing claims acquired the key")
        token = winners[0].token
        for claim in claims:
            if isinstance(claim, Existing):
                self._check_in_progress(claim.record, key, fingerprint, token, "a losing claim")

    @_scenario
    async def test_concurrent_claims_on_distinct_keys_all_acquire(self, store: Store) -> None:
        """Claims on distinct keys never block each other, and every owner gets its own token."""
        keys = [self.new_key() for _ in range(self.concurrency)]
        claims = await asyncio.gather(
            *(store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.long_ttl) for key in keys)
        )
        tokens = [_acquired(claim, "a claim on a distinct fresh key") for claim in claims]
        _require(len(set(tokens)) == len(tokens), "two claims on distinct keys got the same token")

    @_scenario
    async def test_similar_keys_do_not_interfere(self, store: Store) -> None:
        """Keys that differ by a suffix, by case, or by pattern characters (``* ? [ % _ \\``) are distinct keys."""
        base = self.new_key()
        suffixes = ["", "x", ":", "*", "?", "[a-z]", "%", "_", "\\", "'", '"', " ", "{tag}", "~" * 200]
        keys = [base + suffix for suffix in suffixes] + [base.upper(), base[:-1]]
        fingerprints = {key: _fingerprint() for key in keys}
        tokens = {key: await self._claim(store, key, fingerprints[key]) for key in keys}
        first, second, third, *rest = keys
        _require(await store.complete(first, tokens[first], b"first", ttl=self.long_ttl), "complete returned False")
        _require(await store.release(second, tokens[second]), "release by the owner returned False")
        _require(await store.delete(third), "delete of an in-progress record returned False")
        record = _present(await store.get(first), f"get {first!r}")
        self._check_completed(record, first, fingerprints[first], b"first", f"get {first!r}")
        _require(await store.get(second) is None, f"released {second!r} is still there")
        _require(await store.get(third) is None, f"deleted {third!r} is still there")
        for key in rest:
            record = _present(await store.get(key), f"get {key!r} after its neighbours changed")
            self._check_in_progress(record, key, fingerprints[key], tokens[key], f"get {key!r}")
