"""A conformance suite for :class:`idempo.Store` implementations.

Subclass :class:`StoreConformance` in one of your pytest files, tell it how to open your store, and pytest runs
every scenario of the store contract against it: claims and their races, fencing tokens, leases and their
takeover, expiry, replay of payloads byte for byte. idempo runs the same suite against each of its own stores.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, ClassVar

from ._core.records import Acquired, Claim, Existing, Record, State, new_token
from .stores import ScanningStore, Store, SyncScanningStore, SyncStore, takes_token

__all__ = ["StoreConformance", "SyncStoreConformance"]

_Scenario = Callable[["StoreConformance", Store], Coroutine[Any, Any, None]]


def _scenario(body: _Scenario) -> Callable[[StoreConformance], None]:
    """Turn ``async def test_x(self, store)`` into a plain synchronous test method ``test_x(self)``.

    The test runs *body* in a fresh event loop (``asyncio.run``), against a store opened inside that loop and
    closed afterwards, so users need no pytest-asyncio, and clients that bind to a loop (redis-py, psycopg)
    work. Deliberately not ``functools.wraps``: pytest would follow ``__wrapped__`` to *body*'s signature and
    look for a ``store`` fixture.
    """

    def test(self: StoreConformance) -> None:
        __tracebackhide__ = True
        asyncio.run(self._run_scenario(body))

    test.__name__ = body.__name__
    test.__qualname__ = body.__qualname__
    test.__doc__ = body.__doc__
    test.__module__ = body.__module__
    return test


def _scan_scenario(
    body: Callable[[StoreConformance, ScanningStore], Coroutine[Any, Any, None]],
) -> Callable[[StoreConformance], None]:
    """A scenario of the optional ``scan`` capability: skipped for a store that is not a ``ScanningStore``."""

    async def checked(self: StoreConformance, store: Store) -> None:
        __tracebackhide__ = True
        if not isinstance(store, ScanningStore):
            import pytest

            pytest.skip(f"{type(store).__name__} has no scan(): it is not an idempo.stores.ScanningStore")
        await body(self, store)

    checked.__name__ = body.__name__
    checked.__qualname__ = body.__qualname__
    checked.__doc__ = body.__doc__
    checked.__module__ = body.__module__
    return _scenario(checked)


def _require(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O`` and says what went wrong (pytest does not rewrite asserts here)."""
    __tracebackhide__ = True  # pytest shows the scenario line that failed, not this helper
    if not condition:
        raise AssertionError(message)


def _acquired(claim: Claim, what: str) -> str:
    """The token of an ``Acquired`` claim; fails if the claim found a record instead."""
    __tracebackhide__ = True
    if not isinstance(claim, Acquired):
        raise AssertionError(f"{what}: expected Acquired, got {claim!r}")
    token: object = claim.token  # a user's store may be untyped
    if not isinstance(token, str) or not token:
        raise AssertionError(f"{what}: the token must be a non-empty str, got {token!r}")
    return token


def _existing(claim: Claim, what: str) -> Record:
    """The record of an ``Existing`` claim; fails if the claim took the key instead."""
    __tracebackhide__ = True
    if not isinstance(claim, Existing):
        raise AssertionError(f"{what}: expected Existing, got {claim!r}")
    return claim.record


def _present(record: Record | None, what: str) -> Record:
    __tracebackhide__ = True
    if record is None:
        raise AssertionError(f"{what}: expected a record, got None")
    return record


def _same_payload(actual: bytes | None, expected: bytes, what: str) -> None:
    """Byte-for-byte comparison that reports where payloads differ instead of printing megabytes."""
    __tracebackhide__ = True
    if actual == expected:
        return
    if actual is None:
        raise AssertionError(f"{what}: payload is None, expected {len(expected)} bytes")
    if not isinstance(actual, bytes):
        raise AssertionError(f"{what}: payload is a {type(actual).__name__}, expected bytes")
    first = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
    where = f"first difference at byte {first}" if first is not None else "one is a prefix of the other"
    raise AssertionError(f"{what}: payload has {len(actual)} bytes, expected {len(expected)}; {where}")


def _fingerprint() -> str:
    """A fresh fingerprint, shaped like the middleware's (64 hex characters)."""
    return uuid.uuid4().hex + uuid.uuid4().hex


class StoreConformance:
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

    short_lease: ClassVar[float] = 0.2
    short_ttl: ClassVar[float] = 0.2
    expiry_margin: ClassVar[float] = 0.15
    long_lease: ClassVar[float] = 60.0
    long_ttl: ClassVar[float] = 600.0
    concurrency: ClassVar[int] = 50
    large_payload_size: ClassVar[int] = 5 * 1024 * 1024
    clock_tolerance: ClassVar[float] = 60.0
    expires_on_its_own: ClassVar[bool] = False

    # -- what a subclass provides ----------------------------------------------------------------------------

    async def open_store(self) -> Store:
        """Open the store under test. Called inside the event loop of each test; must return a usable store."""
        msg = f"{type(self).__name__} must implement `async def open_store(self) -> Store`"
        raise NotImplementedError(msg)

    async def close_store(self, store: Store) -> None:
        """Close *store* at the end of a test, in the same event loop. The default calls ``store.close()``."""
        await store.close()

    def new_key(self) -> str:
        """A fresh store key, shaped like the middleware's: 32 hex characters, a colon, a client key."""
        return f"{uuid.uuid4().hex}:conformance-{uuid.uuid4()}"

    # -- machinery -------------------------------------------------------------------------------------------

    async def _run_scenario(self, body: _Scenario) -> None:
        __tracebackhide__ = True
        store = await self.open_store()
        try:
            await body(self, store)
        finally:
            await self.close_store(store)

    async def _wait_past(self, seconds: float) -> None:
        """Sleep until a lease or TTL of *seconds*, started before this call, is surely over."""
        await asyncio.sleep(seconds + self.expiry_margin)

    async def _claim(self, store: Store, key: str, fingerprint: str, *, lease: float | None = None) -> str:
        claim = await store.claim(key, fingerprint, lease=lease or self.long_lease, ttl=self.long_ttl)
        return _acquired(claim, f"claim of fresh key {key!r}")

    async def _completed(self, store: Store, payload: bytes = b"done") -> tuple[str, str]:
        """A key completed with *payload* (long TTL), and its fingerprint."""
        key, fingerprint = self.new_key(), _fingerprint()
        token = await self._claim(store, key, fingerprint)
        _require(await store.complete(key, token, payload, ttl=self.long_ttl), "complete by the owner returned False")
        return key, fingerprint

    def _check_in_progress(self, record: Record, key: str, fingerprint: str, token: str, what: str) -> None:
        _require(record.key == key, f"{what}: record.key is {record.key!r}, expected {key!r}")
        _require(record.state is State.IN_PROGRESS, f"{what}: state is {record.state}, expected IN_PROGRESS")
        _require(record.fingerprint == fingerprint, f"{what}: fingerprint is {record.fingerprint!r}")
        _require(record.token == token, f"{what}: token is {record.token!r}, expected the owner's {token!r}")
        _require(record.payload is None, f"{what}: an in-progress record has payload {record.payload!r}")

    def _check_completed(self, record: Record, key: str, fingerprint: str, payload: bytes, what: str) -> None:
        _require(record.key == key, f"{what}: record.key is {record.key!r}, expected {key!r}")
        _require(record.state is State.COMPLETED, f"{what}: state is {record.state}, expected COMPLETED")
        _require(record.fingerprint == fingerprint, f"{what}: fingerprint is {record.fingerprint!r}")
        _require(record.token == "", f"{what}: a completed record keeps token {record.token!r}, expected ''")
        _same_payload(record.payload, payload, what)

    # -- claim ------------------------------------------------------------------------------------------------

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

    # -- complete and replay ----------------------------------------------------------------------------------

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

    # -- leases -----------------------------------------------------------------------------------------------

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

    # -- expiry -----------------------------------------------------------------------------------------------

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

    # -- scan (optional: only for a ScanningStore) ------------------------------------------------------------

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

    def test_close(self) -> None:
        """A store can be closed once without error, whether or not it was used."""

        async def scenario() -> None:
            unused = await self.open_store()
            await self.close_store(unused)
            store = await self.open_store()
            await self._completed(store)
            await self.close_store(store)

        asyncio.run(scenario())


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
        sync = await asyncio.to_thread(self.open_sync_store)
        return _ThreadedScanningStore(sync) if isinstance(sync, SyncScanningStore) else _ThreadedStore(sync)
