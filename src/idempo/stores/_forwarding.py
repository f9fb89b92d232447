"""The one base of every class that wraps a store and forwards its operations. Strictly private.

A wrapper overrides only what it changes: one operation (a method of its own, which may call ``super()``), or how
every call is made (:meth:`ForwardingStore._forward`: timed for an observer, run in a thread, refused, or made on a
sync store with nothing to await).
"""

from __future__ import annotations

from typing import Any, Literal

from .._core.records import Claim, Record

__all__ = ["ForwardingStore", "Operation"]

Operation = Literal["claim", "renew", "complete", "release", "get", "delete", "purge_expired", "close"]
"""The eight operations of :class:`~idempo.stores.Store`."""


class ForwardingStore:
    """A :class:`~idempo.stores.Store` whose eight operations all go through :meth:`_forward`, which by default
    awaits the same operation of the store it wraps.

    It has no ``scan``: listing records is a capability (:class:`~idempo.stores.ScanningStore`) that a wrapper
    declares only if it has it.
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._inner!r})"

    async def _forward(self, operation: Operation, /, *args: Any, **kwargs: Any) -> Any:
        """Perform *operation* with these arguments: ``await self._inner.<operation>(*args, **kwargs)``."""
        return await getattr(self._inner, operation)(*args, **kwargs)

    async def claim(self, key: str, fingerprint: str, *, lease: float, ttl: float, token: str | None = None) -> Claim:
        """See :meth:`idempo.Store.claim`."""
        if token is None:  # a store written before claim(token=) was part of the protocol need not take it
            result: Claim = await self._forward("claim", key, fingerprint, lease=lease, ttl=ttl)
        else:
            result = await self._forward("claim", key, fingerprint, lease=lease, ttl=ttl, token=token)
        return result

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """See :meth:`idempo.Store.renew`."""
        result: bool = await self._forward("renew", key, token, lease=lease)
        return result

    async def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """See :meth:`idempo.Store.complete`."""
        result: bool = await self._forward("complete", key, token, payload, ttl=ttl)
        return result

    async def release(self, key: str, token: str) -> bool:
        """See :meth:`idempo.Store.release`."""
        result: bool = await self._forward("release", key, token)
        return result

    async def get(self, key: str) -> Record | None:
        """See :meth:`idempo.Store.get`."""
        result: Record | None = await self._forward("get", key)
        return result

    async def delete(self, key: str) -> bool:
        """See :meth:`idempo.Store.delete`."""
        result: bool = await self._forward("delete", key)
        return result

    async def purge_expired(self) -> int:
        """See :meth:`idempo.Store.purge_expired`."""
        result: int = await self._forward("purge_expired")
        return result

    async def close(self) -> None:
        """See :meth:`idempo.Store.close`."""
        await self._forward("close")
