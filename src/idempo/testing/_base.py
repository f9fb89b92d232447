"""What every scenario group of the conformance suite stands on: the class attributes a user tunes, the hooks a
user implements, the decorators that turn ``async def`` scenarios into plain pytest tests, and the checks they share.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from .._core.records import Acquired, Claim, Existing, Record, State
from ..stores import ScanningStore, Store

_Suite = TypeVar("_Suite", bound="ConformanceBase")


def _scenario(body: Callable[[_Suite, Store], Coroutine[Any, Any, None]]) -> Callable[[_Suite], None]:
    """Turn ``async def test_x(self, store)`` into a plain synchronous test method ``test_x(self)``.

    The test runs *body* in a fresh event loop (``asyncio.run``), against a store opened inside that loop and
    closed afterwards, so users need no pytest-asyncio, and clients that bind to a loop (redis-py, psycopg)
    work. Deliberately not ``functools.wraps``: pytest would follow ``__wrapped__`` to *body*'s signature and
    look for a ``store`` fixture.
    """

    def test(self: _Suite) -> None:
        __tracebackhide__ = True
        asyncio.run(self._run_scenario(body))

    test.__name__ = body.__name__
    test.__qualname__ = body.__qualname__
    test.__doc__ = body.__doc__
    test.__module__ = body.__module__
    return test


def _scan_scenario(
    body: Callable[[_Suite, ScanningStore], Coroutine[Any, Any, None]],
) -> Callable[[_Suite], None]:
    """A scenario of the optional ``scan`` capability: skipped for a store that is not a ``ScanningStore``."""

    async def checked(self: _Suite, store: Store) -> None:
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


class ConformanceBase:
    """The settings and hooks of :class:`idempo.testing.StoreConformance` (documented there), and the helpers its
    scenario groups share. Not a suite by itself: it has no scenarios."""

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

    async def _run_scenario(self: _Suite, body: Callable[[_Suite, Store], Coroutine[Any, Any, None]]) -> None:
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
