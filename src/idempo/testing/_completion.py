"""The completion and fencing scenarios: a completed record replayed byte for byte, final, and kept from a second
complete; a wrong token or an unknown key refused; a released key claimable again."""

from __future__ import annotations

import random
import time
import uuid

from ..stores import Store
from ._base import ConformanceBase, _existing, _fingerprint, _present, _require, _same_payload, _scenario


class CompletionScenarios(ConformanceBase):
    """Completion and replay, and the fencing of every operation by the owner's token."""

    @_scenario
    async def test_completed_record_is_replayed(self, store: Store) -> None:
        """After ``complete``, claims and ``get`` return the completed record with the payload, token ``""``."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        payload = b'{"id": "ch_1", "amount": 100}'
        before = time.time()
        _require(await store.complete(key, token, payload, ttl=self.long_ttl), "complete by the owner returned False")
        record = _existing(await store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl), "replay")
        self._check_completed(record, key, fingerprint, payload, "claim after complete")
        record = _present(await store.get(key), "get after complete")
        self._check_completed(record, key, fingerprint, payload, "get after complete")
        expires_in = record.expires_at - before
        _require(abs(expires_in - self.long_ttl) <= self.clock_tolerance, f"expires {expires_in} s after complete")

    @_scenario
    async def test_large_payload_round_trips(self, store: Store) -> None:
        """A multi-megabyte payload comes back byte for byte."""
        payload = random.Random(20240917).randbytes(self.large_payload_size)
        key, fingerprint = await self._completed(store, payload)
        record = _existing(await store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl), "replay")
        _same_payload(record.payload, payload, "claim after completing with a large payload")
        _same_payload(_present(await store.get(key), "get").payload, payload, "get of a large payload")

    @_scenario
    async def test_binary_payload_round_trips(self, store: Store) -> None:
        """A payload with every byte value (NULs, invalid UTF-8) comes back byte for byte."""
        payload = b"\x00" + bytes(range(256)) + bytes(reversed(range(256))) + b"\xff\xfe\x00"
        key, fingerprint = await self._completed(store, payload)
        record = _existing(await store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl), "replay")
        _same_payload(record.payload, payload, "claim after completing with a binary payload")
        _same_payload(_present(await store.get(key), "get").payload, payload, "get of a binary payload")

    @_scenario
    async def test_empty_payload_round_trips(self, store: Store) -> None:
        """An empty payload is stored as ``b""``, not lost as ``None``."""
        key, fingerprint = await self._completed(store, b"")
        record = _existing(await store.claim(key, fingerprint, lease=self.long_lease, ttl=self.long_ttl), "replay")
        self._check_completed(record, key, fingerprint, b"", "claim after completing with an empty payload")

    @_scenario
    async def test_other_fingerprint_gets_original_record(self, store: Store) -> None:
        """A claim with another fingerprint returns the record as it is, with the original fingerprint."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        before = await store.get(key)
        record = _existing(await store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.long_ttl), "claim")
        self._check_in_progress(record, key, fingerprint, token, "claim with another fingerprint, in progress")
        _require(await store.get(key) == before, "a claim with another fingerprint changed the in-progress record")
        _require(await store.complete(key, token, b"result", ttl=self.long_ttl), "complete by the owner returned False")
        before = await store.get(key)
        record = _existing(await store.claim(key, _fingerprint(), lease=self.long_lease, ttl=self.long_ttl), "claim")
        self._check_completed(record, key, fingerprint, b"result", "claim with another fingerprint, completed")
        _require(await store.get(key) == before, "a claim with another fingerprint changed the completed record")

    @_scenario
    async def test_complete_twice_keeps_first_payload(self, store: Store) -> None:
        """A second ``complete`` with the same token is refused and does not replace the payload."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        _require(await store.complete(key, token, b"first", ttl=self.long_ttl), "first complete returned False")
        _require(not await store.complete(key, token, b"second", ttl=self.long_ttl), "second complete returned True")
        record = _present(await store.get(key), "get after two completes")
        self._check_completed(record, key, fingerprint, b"first", "get after two completes")

    @_scenario
    async def test_completed_record_is_final(self, store: Store) -> None:
        """Once completed, ``renew`` and ``release`` are refused (with the old token, or the record's ``""``)."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        _require(await store.complete(key, token, b"result", ttl=self.long_ttl), "complete returned False")
        before = await store.get(key)
        for candidate in (token, ""):
            _require(
                not await store.renew(key, candidate, lease=self.long_lease), f"renew({candidate!r}) after complete"
            )
            _require(not await store.release(key, candidate), f"release({candidate!r}) after complete returned True")
            _require(
                not await store.complete(key, candidate, b"other", ttl=self.long_ttl),
                f"complete({candidate!r}) after complete returned True",
            )
        _require(await store.get(key) == before, "refused operations changed the completed record")

    # -- fencing ----------------------------------------------------------------------------------------------

    @_scenario
    async def test_wrong_token_is_refused(self, store: Store) -> None:
        """``renew``, ``complete`` and ``release`` with a token that does not own the key return ``False``."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        before = _present(await store.get(key), "get after a claim")
        for wrong in (uuid.uuid4().hex, "", token + "x", token[:-1]):
            _require(not await store.renew(key, wrong, lease=self.long_lease), f"renew with token {wrong!r}")
            _require(not await store.complete(key, wrong, b"forged", ttl=self.long_ttl), f"complete with {wrong!r}")
            _require(not await store.release(key, wrong), f"release with token {wrong!r} returned True")
        _require(await store.get(key) == before, "operations with a wrong token changed the record")

    @_scenario
    async def test_operations_on_unknown_key_are_refused(self, store: Store) -> None:
        """``renew``, ``complete`` and ``release`` of a key nobody claimed return ``False`` and create nothing."""
        key, token = self.new_key(), uuid.uuid4().hex
        _require(not await store.renew(key, token, lease=self.long_lease), "renew of an unknown key returned True")
        _require(not await store.complete(key, token, b"x", ttl=self.long_ttl), "complete of an unknown key")
        _require(not await store.release(key, token), "release of an unknown key returned True")
        _require(await store.get(key) is None, "an operation on an unknown key created a record")
        await self._claim(store, key, _fingerprint())

    @_scenario
    async def test_release_makes_key_claimable(self, store: Store) -> None:
        """``release`` drops the claim: the key is absent, and the next claim takes it with a new token."""
        key = self.new_key()
        token = await self._claim(store, key, _fingerprint())
        _require(await store.release(key, token), "release by the owner returned False")
        _require(await store.get(key) is None, "get after release returned a record")
        _require(not await store.release(key, token), "a second release returned True")
        fingerprint = _fingerprint()
        new_token = await self._claim(store, key, fingerprint)
        _require(new_token != token, "the claim after a release got the released token again")
        record = _present(await store.get(key), "get after claiming a released key")
        self._check_in_progress(record, key, fingerprint, new_token, "get after claiming a released key")
