"""The store of a blocking face: made from what the user gave, and checked once when the face is built. Strictly
private."""

from __future__ import annotations

import inspect
import logging
from typing import cast

from .._core.errors import ConfigurationError, StoreError
from .._core.policy import Policy
from ..stores import Store, SyncStore, sync_store_from_url

__all__ = ["check_at_start", "check_store", "sync_store"]

logger = logging.getLogger("idempo")

_PROBE = "idempo:startup-check"  # a key no one writes: its get is one harmless round trip


def sync_store(store: SyncStore | Store | str) -> SyncStore:
    """A :class:`~idempo.SyncStore` from a store URL, a sync store, or an async store's ``.sync()`` twin.

    Raises:
        ConfigurationError: a bad URL, something that is not a store, or an async store without a sync twin.
    """
    if isinstance(store, str):
        return sync_store_from_url(store)
    if not callable(getattr(store, "claim", None)):
        msg = f"store must be a SyncStore or a store URL, not {store!r}"
        raise ConfigurationError(msg)
    if not inspect.iscoroutinefunction(store.claim):
        return cast(SyncStore, store)
    to_sync = getattr(store, "sync", None)
    if not callable(to_sync):
        msg = f"{store!r} is an async store without .sync(); a WSGI application needs a SyncStore (or a store URL)"
        raise ConfigurationError(msg)
    result: SyncStore = to_sync()
    return result


def check_store(store: SyncStore) -> None:
    """Ask *store* once (a ``get``).

    Raises:
        StoreError: the store does not answer, or fails (the driver's exception is ``__cause__``).
    """
    try:
        store.get(_PROBE)
    except StoreError:
        raise
    except Exception as exc:
        msg = f"{exc!r}" if not str(exc) else str(exc)
        raise StoreError(msg) from exc


def check_at_start(store: SyncStore, policy: Policy) -> None:
    """The start-up check of a blocking face, made when it is built (in each worker, or in gunicorn's master with
    ``--preload``), as ``startup_check`` says: a store that does not answer fails the build (``"fail"``: the worker
    does not boot), or is logged (``"warn"``).

    Raises:
        StoreError: the store does not answer and ``startup_check="fail"``.
    """
    if policy.startup_check == "off":
        return
    try:
        check_store(store)
    except StoreError as exc:
        what = f"idempo: the store {store!r} does not answer ({exc})"
        if policy.startup_check == "fail":
            logger.error("%s", what)
            msg = f"{what}; fix its address, or pass startup_check='warn' to start anyway"
            raise StoreError(msg) from exc
        logger.warning("%s; starting anyway (startup_check='warn')", what)
