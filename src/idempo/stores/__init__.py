"""Stores: where idempo keeps one record per key, and how to open one from a URL.

- ``memory://``: :class:`~idempo.stores.memory.MemoryStore`, one process, bounded; for tests and development.
- ``sqlite:///path.db``: :class:`~idempo.stores.sqlite.SQLiteStore`, the embedded default; one machine.
- ``redis://``, ``rediss://``, ``redis+cluster://h1:p1,h2:p2``: :class:`~idempo.stores.redis.RedisStore`, one Lua
  script per operation (extra ``redis``).
- ``postgresql://``, ``postgres://``: :class:`~idempo.stores.postgres.PostgresStore`, one statement per operation
  (extra ``postgres``).

Options go in the query string, e.g. ``memory://?max_entries=1000`` or ``sqlite:///idempo.db?table=idem``.

Every built-in store can also list its records (:class:`ScanningStore`, :class:`SyncScanningStore`): an optional
capability, not part of :class:`Store`, so that a user's own store need not offer it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final, Protocol, runtime_checkable

from .._core.bound import Target
from .._core.errors import ConfigurationError
from .._core.extras import require
from .._core.records import Claim, Record
from ._url import StoreURL, parse_store_url, redact

__all__ = [
    "SCHEMES",
    "SYNC_SCHEMES",
    "ScanningStore",
    "Store",
    "StoreURL",
    "SyncScanningStore",
    "SyncStore",
    "parse_store_url",
    "redact",
    "require",
    "store_from_url",
    "sync_store_from_url",
    "takes_token",
    "transaction_target",
]


@runtime_checkable
class Store(Protocol):
    """**Protocol:** where idempo keeps one record per key. Payloads are opaque bytes.

    Each operation is one atomic round trip to the backend. ``renew``, ``complete`` and ``release`` are
    *fenced*: they take effect only if *token* is the token of the record's current owner, so an owner whose
    lease ran out and whose key was taken over can never overwrite the new owner's record. Expired records
    (past ``expires_at``) are treated as absent everywhere; an ``IN_PROGRESS`` record past its lease is *stale*:
    ``claim`` takes it over, while ``get`` still shows it and its owner may still complete it until then.

    Backend failures are raised as :class:`~idempo.StoreError`. Run ``idempo.testing.StoreConformance``
    against your own implementation to prove it.
    """

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """Atomically take *key* for *lease* seconds, unless a live record is there.

        *token*, if given, is the fencing token the new owner gets (a fresh :func:`~idempo._core.records.new_token`
        the caller drew, so that it can release a claim whose answer it never received, e.g. because the call
        timed out after the store had made it); else the store draws one.

        Returns:
            ``Acquired(token)`` if the key was absent, expired, or in progress with its lease run out (taken
            over); else ``Existing(record)`` with the live record, whatever its fingerprint.
        """
        ...

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Extend the lease of an in-progress claim to *lease* seconds from now. ``False`` if *token* no longer
        owns *key* (taken over, completed, released or expired)."""
        ...

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store *payload* as the result of *key*, kept *ttl* seconds from now, if *token* still owns it.

        Returns:
            ``False`` if another owner took the key over (the payload is not stored). An owner whose lease ran
            out but whose key nobody claimed again still completes.
        """
        ...

    async def release(self, key: str, token: str) -> bool:
        """Drop an in-progress claim, so that a retry runs again. ``False`` if *token* does not own *key*."""
        ...

    async def get(self, key: str) -> Record | None:
        """The live record under *key*, or ``None``."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove *key* whatever its state. ``True`` if there was a record. For operators, not for requests."""
        ...

    async def purge_expired(self) -> int:
        """Remove expired records now; returns how many. Stores that expire on their own return 0."""
        ...

    async def close(self) -> None:
        """Release connections and threads. The store is not used afterwards."""
        ...


def takes_token(store: Store | SyncStore) -> bool:
    """Whether *store*'s ``claim`` takes the caller's ``token=`` (every built-in store does; a store written
    before it was part of the protocol may not, and then draws its own)."""
    try:
        parameters = inspect.signature(store.claim).parameters
    except (TypeError, ValueError):
        return False
    return "token" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def transaction_target(store: object) -> Target | None:
    """Where *store* (or the store a wrapper of it forwards to) keeps its records, if a transaction of the
    application's can complete a key there (the PostgreSQL and SQLite stores); else ``None``."""
    while True:
        if getattr(type(store), "_transaction_target", None) is not None:
            target: Target = store._transaction_target()  # type: ignore[attr-defined]
            return target
        store = getattr(store, "_inner", None)
        if store is None:
            return None


_REDIS = "idempo.stores.redis:RedisStore"
_POSTGRES = "idempo.stores.postgres:PostgresStore"


@runtime_checkable
class SyncStore(Protocol):
    """**Protocol:** the blocking twin of :class:`Store`, for sync callers (the ``@idempotent`` decorator on plain
    functions, Celery and RQ workers, scripts): the same eight operations with the same contract, as plain methods.

    Each built-in backend has one (``sync_store_from_url``), running the same Lua script or SQL statement as its
    async store through the blocking API of the same client library; none runs an event loop behind the caller's
    back, so a sync store may be called from inside a running loop's thread without deadlock (it blocks that
    thread for one round trip, like any blocking client). Safe to share between threads.

    (``isinstance`` cannot tell a ``SyncStore`` from a :class:`Store`: both have the same method names. Use
    ``inspect.iscoroutinefunction(store.claim)`` to tell them apart.)
    """

    def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`Store.claim`."""
        ...

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`Store.renew`."""
        ...

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`Store.complete`."""
        ...

    def release(self, key: str, token: str) -> bool:
        """See :meth:`Store.release`."""
        ...

    def get(self, key: str) -> Record | None:
        """See :meth:`Store.get`."""
        ...

    def delete(self, key: str) -> bool:
        """See :meth:`Store.delete`."""
        ...

    def purge_expired(self) -> int:
        """See :meth:`Store.purge_expired`."""
        ...

    def close(self) -> None:
        """See :meth:`Store.close`."""
        ...


@runtime_checkable
class ScanningStore(Store, Protocol):
    """**Protocol:** a :class:`Store` that can also list its records (``idempo keys list`` needs one).

    An optional capability: :class:`Store` does not require it, so a user's own store stays a ``Store``
    without it. Every built-in store has it. Check with ``isinstance(store, ScanningStore)``.

    .. versionadded:: 0.1.0
    """

    def scan(self, prefix: str = "", *, limit: int | None = None) -> AsyncIterator[Record]:
        """Iterate over the live records whose store key starts with *prefix*, matched literally.

        Expired records are absent, as everywhere; in-progress (even stale) and completed records are listed.
        Built-in stores yield in key order, except Redis (in no particular order). The scan is not a snapshot:
        records written while it runs may or may not appear, but each record appears at most once.

        Args:
            prefix: a literal prefix of the store key (no pattern: ``*``, ``?``, ``[``, ``%`` and ``_`` are
                plain characters). The middleware's keys are ``<principal digest>:<Idempotency-Key>``.
            limit: stop after this many records; ``None`` for all of them.

        Raises:
            ValueError: *limit* is negative (raised when the iteration starts).
        """
        ...


@runtime_checkable
class SyncScanningStore(SyncStore, Protocol):
    """**Protocol:** the blocking twin of :class:`ScanningStore`: a :class:`SyncStore` whose ``scan`` returns a
    plain iterator. Every built-in sync store has it.

    .. versionadded:: 0.1.0
    """

    def scan(self, prefix: str = "", *, limit: int | None = None) -> Iterator[Record]:
        """See :meth:`ScanningStore.scan`."""
        ...


SCHEMES: Final[Mapping[str, str]] = {
    "memory": "idempo.stores.memory:MemoryStore",
    "sqlite": "idempo.stores.sqlite:SQLiteStore",
    "redis": _REDIS,
    "rediss": _REDIS,
    "redis+cluster": _REDIS,
    "postgresql": _POSTGRES,
    "postgres": _POSTGRES,
}
"""URL scheme -> ``module:Class`` of the store it opens. Classes are imported only when their URL is used."""


_SYNC_REDIS = "idempo.stores.redis:SyncRedisStore"
_SYNC_POSTGRES = "idempo.stores.postgres:SyncPostgresStore"
SYNC_SCHEMES: Final[Mapping[str, str]] = {
    "memory": "idempo.stores.memory:SyncMemoryStore",
    "sqlite": "idempo.stores.sqlite:SyncSQLiteStore",
    "redis": _SYNC_REDIS,
    "rediss": _SYNC_REDIS,
    "redis+cluster": _SYNC_REDIS,
    "postgresql": _SYNC_POSTGRES,
    "postgres": _SYNC_POSTGRES,
}
"""URL scheme -> ``module:Class`` of the :class:`SyncStore` it opens."""


def _open(url: str, schemes: Mapping[str, str], options: dict[str, Any]) -> Any:
    parsed = parse_store_url(url)
    target = schemes.get(parsed.scheme)
    if target is None:
        msg = f"unknown store scheme {parsed.scheme!r} in {redact(url)!r}; known schemes: {', '.join(schemes)}"
        raise ConfigurationError(msg)
    module_name, _, class_name = target.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module_name), class_name).from_url
    return factory(parsed, **options)


def sync_store_from_url(url: str, **options: Any) -> SyncStore:
    """Open the :class:`SyncStore` *url* names: the same URLs as :func:`store_from_url`.

    Note that ``memory://`` opens a new, empty store; to share records between a :class:`MemoryStore` and sync
    code, use ``MemoryStore.sync()``.
    """
    store: SyncStore = _open(url, SYNC_SCHEMES, options)
    return store


def store_from_url(url: str, **options: Any) -> Store:
    """Open the store *url* names.

    Args:
        url: e.g. ``"memory://"``, ``"sqlite:///idempo.db"`` (relative path), ``"sqlite:////var/lib/app/idem.db"``
            (absolute path). Options may go in the query string.
        **options: keyword options for the store's constructor; they override the query string.

    Raises:
        ConfigurationError: the scheme is unknown or an option is invalid.
        MissingDependency: the store needs an extra that is not installed.
    """
    store: Store = _open(url, SCHEMES, options)
    return store
