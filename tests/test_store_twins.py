"""Every async store and its sync twin expose the same public names with the same signatures, async vs sync the only
difference: the Store/SyncStore protocols, and the classes every URL scheme opens (memory, SQLite, Redis, Redis
Cluster, PostgreSQL). What an async store alone has is listed below, with its reason."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

from idempo.stores import SCHEMES, SYNC_SCHEMES, ScanningStore, Store, SyncScanningStore, SyncStore

ASYNC_ONLY_NAMES = {"sync": "an async store's way to its blocking twin"}
ASYNC_ONLY_PARAMETERS = {
    ("SQLiteStore", "__init__", "inline"): "only the async store runs statements on the event loop's thread",
}
# How a sync twin writes the types an async store writes (the annotations are strings: compared as written).
SYNC_SPELLING = {"AsyncIterator": "Iterator", "Client": "SyncClient"}


def _load(target: str) -> type:
    module, _, name = target.partition(":")
    loaded: type = getattr(importlib.import_module(module), name)
    return loaded


PAIRS = [
    pytest.param(Store, SyncStore, id="Store"),
    pytest.param(ScanningStore, SyncScanningStore, id="ScanningStore"),
    *(pytest.param(_load(SCHEMES[scheme]), _load(SYNC_SCHEMES[scheme]), id=scheme) for scheme in SCHEMES),
]


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def _in_sync_spelling(annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    for written, twin in SYNC_SPELLING.items():
        annotation = re.sub(rf"\b{written}\b", twin, annotation)
    return annotation


def _shape(cls: type, name: str, function: Callable[..., Any]) -> tuple[object, ...]:
    """What a twin must match of *function*: its parameters (name, kind, default, annotation) and its return
    annotation, in the sync spelling, without the parameters the async store alone takes."""
    signature = inspect.signature(function)
    parameters = tuple(
        (p.name, p.kind, p.default, _in_sync_spelling(p.annotation))
        for p in signature.parameters.values()
        if (cls.__name__, name, p.name) not in ASYNC_ONLY_PARAMETERS
    )
    return parameters, _in_sync_spelling(signature.return_annotation)


def _is_async(function: Callable[..., Any]) -> bool:
    """Whether *function* is awaited or iterated with ``async for``."""
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        return True
    annotation = inspect.signature(function).return_annotation
    return isinstance(annotation, str) and annotation.startswith(("AsyncIterator", "Awaitable"))


@pytest.mark.parametrize(("async_class", "sync_class"), PAIRS)
def test_an_async_store_and_its_sync_twin_have_the_same_public_names(async_class: type, sync_class: type) -> None:
    assert _public(async_class) - set(ASYNC_ONLY_NAMES) == _public(sync_class)


@pytest.mark.parametrize(("async_class", "sync_class"), PAIRS)
def test_an_async_store_and_its_sync_twin_have_the_same_signatures(async_class: type, sync_class: type) -> None:
    names = [*sorted(_public(sync_class)), "__init__"]
    for name in names:
        async_member = inspect.getattr_static(async_class, name)
        sync_member = inspect.getattr_static(sync_class, name)
        assert type(async_member) is type(sync_member), name  # both methods, class methods or properties
        if isinstance(async_member, property):
            assert async_member.fget is not None
            assert sync_member.fget is not None
            assert _shape(async_class, name, async_member.fget) == _shape(sync_class, name, sync_member.fget), name
            continue
        async_function, sync_function = getattr(async_class, name), getattr(sync_class, name)
        assert _shape(async_class, name, async_function) == _shape(sync_class, name, sync_function), name
        if name.startswith("__") or isinstance(async_member, classmethod):
            continue
        assert _is_async(async_function), f"{async_class.__name__}.{name} is not async"
        assert not _is_async(sync_function), f"{sync_class.__name__}.{name} is async"


def test_every_operation_of_the_protocols_is_compared() -> None:
    operations = {"claim", "renew", "complete", "release", "get", "delete", "purge_expired", "close"}
    assert _public(Store) == _public(SyncStore) == operations
    assert _public(ScanningStore) == operations | {"scan"}
    assert {"from_url", "sync"} | operations <= _public(_load(SCHEMES["sqlite"]))
