"""``@idempotent``: run a function once per key, and return its stored result to every repeat.

For job workers (Celery, RQ, arq), scripts and services that receive an idempotency key (a job id, the request's
``Idempotency-Key``) and must act on it exactly once::

    from idempo import idempotent

    @idempotent("sqlite:///idempo.db", key="charge:{order_id}")
    def charge(order_id: str, amount: int) -> Receipt: ...

Theory of operation, for one call (the same steps as the middleware's, over the same store and ``decide``):

1. Bind the arguments to the function's signature (defaults applied), format the key, and fingerprint the
   arguments.
2. ``claim`` the store key ``fn:<namespace>:<key>``. The store either hands it over (run the function) or returns
   the record already there, which ``decide`` turns into the stored result (same arguments, completed), a
   :class:`~idempo.KeyReuseError` (other arguments) or a :class:`~idempo.InProgressError` (still running; or
   wait for it, if asked).
3. Run the function, renewing the lease every ``lease / 3`` seconds: an asyncio task for a coroutine function,
   a daemon thread for a plain one.
4. ``complete`` the record with the serialized return value; or, if the function raised, ``release`` the key
   (nothing is stored, a retry runs again) and let the exception through. A completed run is never forgotten:
   a result the serializer cannot store, or one the store will not take (full), completes the key with the small
   "not stored" marker instead, so that a repeat raises :class:`~idempo.ResponseNotStoredError` rather than
   running again; a function that reports its outcome unknown (raising :class:`~idempo.OutcomeUnknownError`, or
   calling :func:`~idempo.mark_outcome_unknown`) leaves the key in the "outcome unknown" state, and repeats raise
   ``OutcomeUnknownError``.

Decisions, for reference:

- **Store key**: ``f"fn:{namespace}:{key}"``, *namespace* defaulting to ``f"{fn.__module__}.{fn.__qualname__}"``.
  The middleware's keys start with 32 hex digits, so the two never collide. Renaming or moving a function changes
  its default namespace (and orphans its keys): pass ``namespace=`` to keep it stable, or to let two functions
  share keys.
- **Fingerprint**: SHA-256 of canonical JSON (sorted keys, no whitespace) of the bound arguments, defaults applied,
  so ``f(1, b=2)`` and ``f(a=1, b=2)`` are the same call. Pydantic models count as ``model_dump(mode="json")``,
  dataclasses as their fields, sets in sorted order, mappings with their keys as strings; any other object as its
  ``repr``, except that an object with the default ``object.__repr__`` (which shows a memory address) counts as
  its type's name only: a database session or an HTTP client passed in is "present", not "different every time".
- **Serialization**: a :class:`Serializer` turns the return value into bytes and back, given the function's
  return annotation. The default, :class:`JSONSerializer`, writes JSON, and brings back what it wrote as it was:
  datetimes, dates, times, timedeltas, UUIDs, Decimals, bytes, complex numbers, tuples, sets and dicts with
  keys that are not strings are written as tagged JSON objects and come back as the same type and value; pydantic
  models and dataclasses are written as their JSON form and rebuilt as the annotated type (also inside
  ``list[...]``, ``dict[str, ...]``, ``tuple[...]`` and ``X | None``), as are enums and named tuples.
- **Stores**: a coroutine function uses an async :class:`~idempo.Store` (a URL opens one with
  :func:`~idempo.store_from_url`). A plain function uses a :class:`~idempo.stores.SyncStore` (a URL opens one with
  :func:`~idempo.stores.sync_store_from_url`; a built-in async store is turned into its blocking twin with its
  ``.sync()``, over the same records). A plain function therefore never needs an event loop, and called from
  inside a running loop's thread it simply blocks that thread for the store's round trips, like any blocking
  client.
"""

from __future__ import annotations

import asyncio
import base64
import collections.abc
import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import json
import logging
import threading
import time
import types
import typing
import uuid
import zoneinfo
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

from ._core.codec import decode_value, encode_not_stored, encode_outcome_unknown, encode_value
from ._core.decide import Conflict, Mismatch, NotStored, Replay, decide, fallback
from ._core.errors import (
    ConfigurationError,
    InProgressError,
    InvalidKeyError,
    KeyReuseError,
    OutcomeUnknownError,
    ResponseNotStoredError,
    StoreFullError,
)
from ._core.outcome import OutcomeReport
from ._core.records import Acquired, Claim
from .stores import Store, SyncStore, store_from_url, sync_store_from_url

__all__ = ["JSONSerializer", "Serializer", "fingerprint_arguments", "idempotent"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("idempo")

_WAIT_POLL_FIRST = 0.02
_WAIT_POLL_MAX = 0.5


@runtime_checkable
class Serializer(Protocol):
    """**Protocol:** how ``@idempotent`` stores a return value, and rebuilds it for a repeat.

    ``dumps`` raises ``TypeError`` (or ``ValueError``) for a value it cannot store. ``loads`` is given the
    function's resolved return annotation (``typing.Any`` when it has none, the awaited type for a coroutine
    function) so that it can rebuild the same type.
    """

    def dumps(self, value: Any) -> bytes:
        """The bytes to store for *value*."""
        ...

    def loads(self, data: bytes, annotation: Any) -> Any:
        """The value *data* stands for, as the type *annotation* says where it can."""
        ...


class JSONSerializer:
    """The default :class:`Serializer`: compact UTF-8 JSON that brings back what it stored.

    JSON values are written as they are. So that a result comes back as it was returned, whatever the annotation,
    ``datetime``, ``date``, ``time`` and ``timedelta`` (time zones kept: a ``zoneinfo`` zone by its name, any
    other by its offset), ``UUID``, ``Decimal``, ``bytes`` and ``bytearray``, ``complex``, ``tuple``, ``set`` and
    ``frozenset``, and dicts whose keys are not all strings (or that hold the tag key itself) are written as
    one-key objects ``{"__idempo__": [type, value]}`` and rebuilt. Pydantic models (``model_dump(mode="json")``),
    dataclasses (their fields) and enums (their values) are written as JSON and rebuilt as the return annotation
    says where it names them (also inside ``list[...]``, ``dict[..., ...]``, ``tuple[...]``, ``set[...]`` and
    ``X | None``), as are named tuples. Anything else raises ``TypeError``: ``@idempotent`` then keeps the key
    done without its result (a repeat raises :class:`~idempo.ResponseNotStoredError`), so pass another
    serializer for such results.
    """

    def dumps(self, value: Any) -> bytes:
        """See :meth:`Serializer.dumps`."""
        return json.dumps(_tagged(value, 0), ensure_ascii=False, separators=(",", ":")).encode()

    def loads(self, data: bytes, annotation: Any) -> Any:
        """See :meth:`Serializer.loads`."""
        return _rebuild(annotation, json.loads(data, object_hook=_untag))


def _is_pydantic_model(value: Any) -> bool:
    # Duck-typed, so that idempo never imports pydantic.
    return hasattr(value, "model_dump") and hasattr(type(value), "model_validate")


_TAG = "__idempo__"
_MAX_DEPTH = 500  # deeper than any result worth storing; json would hit the recursion limit anyway


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {_TAG: [kind, value]}


def _tagged(value: Any, depth: int) -> Any:
    """*value* as JSON data, with the types JSON lacks written as tagged objects (see :class:`JSONSerializer`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth > _MAX_DEPTH:
        msg = "a return value nested this deep cannot be stored as JSON"
        raise ValueError(msg)
    depth += 1
    if isinstance(value, enum.Enum):
        return _tagged(value.value, depth)
    for plain in (bool, str, int, float):  # a subclass (an enum was handled above): stored as its plain value
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, list):
        return [_tagged(item, depth) for item in value]
    if isinstance(value, dict):
        if all(type(name) is str for name in value) and _TAG not in value:
            return {name: _tagged(item, depth) for name, item in value.items()}
        return _tag("dict", [[_tagged(name, depth), _tagged(item, depth)] for name, item in value.items()])
    if isinstance(value, tuple):
        if hasattr(value, "_fields"):  # a named tuple: rebuilt from the annotation, like a dataclass
            return [_tagged(item, depth) for item in value]
        return _tag("tuple", [_tagged(item, depth) for item in value])
    if isinstance(value, set | frozenset):
        items = sorted((_tagged(item, depth) for item in value), key=_dumps)
        return _tag("frozenset" if isinstance(value, frozenset) else "set", items)
    if isinstance(value, datetime.datetime):
        zone = value.tzinfo.key if isinstance(value.tzinfo, zoneinfo.ZoneInfo) else None
        return _tag("datetime", [value.replace(tzinfo=None).isoformat() if zone else value.isoformat(), zone])
    if isinstance(value, datetime.date):
        return _tag("date", value.isoformat())
    if isinstance(value, datetime.time):
        return _tag("time", value.isoformat())
    if isinstance(value, datetime.timedelta):
        return _tag("timedelta", [value.days, value.seconds, value.microseconds])
    if isinstance(value, uuid.UUID):
        return _tag("uuid", str(value))
    if isinstance(value, decimal.Decimal):
        return _tag("decimal", str(value))
    if isinstance(value, bytes | bytearray):
        return _tag("bytes" if isinstance(value, bytes) else "bytearray", base64.b64encode(value).decode("ascii"))
    if isinstance(value, complex):
        return _tag("complex", [value.real, value.imag])
    if not isinstance(value, type):
        if _is_pydantic_model(value):
            return _tagged(value.model_dump(mode="json"), depth)
        if dataclasses.is_dataclass(value):
            return {field.name: _tagged(getattr(value, field.name), depth) for field in dataclasses.fields(value)}
    msg = f"a return value of type {type(value).__qualname__} cannot be stored as JSON; pass serializer="
    raise TypeError(msg)


def _untag(document: dict[str, Any]) -> Any:
    """The ``object_hook`` that rebuilds what :func:`_tagged` tagged; other objects are left as they are."""
    if len(document) != 1 or _TAG not in document:
        return document
    kind, value = document[_TAG]
    rebuild = _UNTAG.get(kind)
    if rebuild is None:
        msg = f"unknown tagged value {kind!r} in a stored result"
        raise ValueError(msg)
    return rebuild(value)


def _datetime(value: list[Any]) -> datetime.datetime:
    text, zone = value
    moment = datetime.datetime.fromisoformat(text)
    return moment.replace(tzinfo=zoneinfo.ZoneInfo(zone)) if zone else moment


_UNTAG: dict[str, Callable[[Any], Any]] = {
    "dict": lambda items: {_hashable(name): item for name, item in items},
    "tuple": tuple,
    "set": lambda items: {_hashable(item) for item in items},
    "frozenset": lambda items: frozenset(_hashable(item) for item in items),
    "datetime": _datetime,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "timedelta": lambda parts: datetime.timedelta(days=parts[0], seconds=parts[1], microseconds=parts[2]),
    "uuid": uuid.UUID,
    "decimal": decimal.Decimal,
    "bytes": base64.b64decode,
    "bytearray": lambda text: bytearray(base64.b64decode(text)),
    "complex": lambda parts: complex(parts[0], parts[1]),
}


def _hashable(value: Any) -> Any:
    """A list that was a tuple's JSON form inside a set or a dict key, back as a tuple (a list is unhashable)."""
    return tuple(_hashable(item) for item in value) if isinstance(value, list) else value


def _rebuild(annotation: Any, value: Any) -> Any:
    """*value*, decoded from JSON, as *annotation* says: models and dataclasses rebuilt, containers recursed."""
    if value is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is None:
        if not isinstance(annotation, type):
            return value
        if hasattr(annotation, "model_validate") and hasattr(annotation, "model_dump"):
            return annotation.model_validate(value)
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            try:
                hints = typing.get_type_hints(annotation)
            except Exception:  # noqa: BLE001 - unresolvable field types: leave those fields as JSON
                hints = {}
            init_fields = (field for field in dataclasses.fields(annotation) if field.init and field.name in value)
            return annotation(
                **{field.name: _rebuild(hints.get(field.name, Any), value[field.name]) for field in init_fields}
            )
        if isinstance(value, list | tuple) and issubclass(annotation, tuple | set | frozenset):
            return annotation(*value) if hasattr(annotation, "_fields") else annotation(value)  # a NamedTuple
        if issubclass(annotation, enum.Enum):
            return annotation(value)
        return value
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _rebuild(args[0], value)
    if origin is typing.Union or origin is types.UnionType:
        options = [arg for arg in args if arg is not type(None)]
        return _rebuild(options[0], value) if len(options) == 1 else value
    if isinstance(value, list | tuple | set | frozenset):
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_rebuild(args[0], item) for item in value)
            if len(args) == len(value):
                return tuple(_rebuild(arg, item) for arg, item in zip(args, value, strict=True))
            return tuple(value)
        item_type = args[0] if args else Any
        if origin in (set, frozenset):
            return origin(_rebuild(item_type, item) for item in value)
        if origin in (list, collections.abc.Sequence, collections.abc.MutableSequence, collections.abc.Iterable):
            return [_rebuild(item_type, item) for item in value]
        return value
    if isinstance(value, dict) and origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        value_type = args[1] if len(args) == 2 else Any
        return {name: _rebuild(value_type, item) for name, item in value.items()}
    return value


def _canonical(value: Any) -> Any:
    """*value* as plain JSON data, the same for equal arguments in any process."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, Mapping):
        return {
            item_key if isinstance(item_key, str) else _dumps(_canonical(item_key)): _canonical(item)
            for item_key, item in value.items()
        }
    if isinstance(value, set | frozenset):
        return sorted((_canonical(item) for item in value), key=_dumps)
    if not isinstance(value, type):
        if _is_pydantic_model(value):
            return _canonical(value.model_dump(mode="json"))
        if dataclasses.is_dataclass(value):
            return {field.name: _canonical(getattr(value, field.name)) for field in dataclasses.fields(value)}
    kind = type(value)
    # "<Session object at 0x7f...>": an address means nothing to a retry, so such an object counts by its type.
    if getattr(kind, "__repr__", None) is object.__repr__:
        return f"<{kind.__module__}.{kind.__qualname__}>"
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint_arguments(arguments: Mapping[str, Any]) -> str:
    """The fingerprint ``@idempotent`` gives a call: SHA-256 (64 hex characters) of the canonical JSON of its
    bound arguments (see the module's documentation for how each kind of value counts)."""
    return hashlib.sha256(_dumps(_canonical(dict(arguments))).encode("utf-8", "surrogatepass")).hexdigest()


_UNRESOLVED: Any = object()


class _Spec:
    """What one decorated function needs per call, shared by its sync and async runners. Strictly private."""

    __slots__ = (
        "fn",
        "key",
        "lease",
        "namespace",
        "on_conflict",
        "return_type",
        "serializer",
        "signature",
        "ttl",
        "unknown_outcome_ttl",
        "wait_timeout",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        key: str | Callable[..., str],
        ttl: float,
        lease: float,
        on_conflict: str,
        wait_timeout: float,
        serializer: Serializer,
        namespace: str,
        unknown_outcome_ttl: float,
    ) -> None:
        self.fn = fn
        self.key = key
        self.ttl = ttl
        self.unknown_outcome_ttl = unknown_outcome_ttl
        self.lease = lease
        self.on_conflict = on_conflict
        self.wait_timeout = wait_timeout
        self.serializer = serializer
        self.namespace = namespace
        self.signature = inspect.signature(fn)
        self.return_type = _UNRESOLVED

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """The store key and the fingerprint of a call."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if isinstance(self.key, str):
            try:
                key = self.key.format(**arguments)
            except (KeyError, IndexError, AttributeError) as exc:
                msg = f"key {self.key!r} of {self.namespace} names {exc} that the call does not have"
                raise ConfigurationError(msg) from exc
        else:
            produced: object = self.key(*args, **kwargs)
            if not isinstance(produced, str):
                msg = f"the key function of {self.namespace} returned {type(produced).__qualname__}, not str"
                raise TypeError(msg)
            key = produced
        if not key:
            msg = f"the key of this call of {self.namespace} is empty"
            raise InvalidKeyError(msg)
        if self.return_type is _UNRESOLVED:
            self.return_type = _return_type(self.fn)
        return f"fn:{self.namespace}:{key}", fingerprint_arguments(arguments)

    def outcome(self, store_key: str, result: Any, report: OutcomeReport) -> tuple[bytes, float]:
        """What to ``complete`` a call's key with, and for how long: the framed serialised *result*; or the
        "outcome unknown" marker if the function reported its outcome unknown (*report*); or, for a result that
        cannot be serialised, the "not stored" marker."""
        if report.unknown:
            logger.warning("idempo: the outcome of %r is unknown; its key is kept until resolved or expired", store_key)
            return encode_outcome_unknown(), self.unknown_outcome_ttl
        try:
            data = self.serializer.dumps(result)
        except (TypeError, ValueError) as exc:
            logger.error(
                "idempo: the result of %r cannot be serialised (%s): the key is kept done without it, and a "
                "repeat raises ResponseNotStoredError; pass serializer= to store such results",
                store_key,
                exc,
            )
            return encode_not_stored(0, "unserializable"), self.ttl
        return encode_value(data), self.ttl

    def existing(self, claim: Claim, store_key: str, fingerprint: str, deadline: float, delay: float) -> Any:
        """What a call gets from a record it found: the stored value, or an error; ``_WAIT`` to poll again."""
        assert not isinstance(claim, Acquired)
        decision = decide(claim.record, fingerprint, now=time.time(), retry_after=self.lease)
        if isinstance(decision, Replay):
            try:
                value = decode_value(decision.payload)
            except ValueError:
                logger.error("idempo: the stored result of %r cannot be decoded", store_key)
                value = None
            if isinstance(value, bytes):
                return self.serializer.loads(value, self.return_type)
            decision = NotStored(0, "unreadable")  # a payload that is not ours
        if isinstance(decision, Mismatch):
            msg = f"{store_key!r} was first used with different arguments; use a new key for a new call"
            raise KeyReuseError(msg)
        if isinstance(decision, NotStored):
            msg = f"{store_key!r} ran to completion, but its result was not stored ({decision.reason}); not run again"
            raise ResponseNotStoredError(msg, original_status=0, reason=decision.reason)
        if not isinstance(decision, Conflict):  # Unknown
            raise decision.error()
        if self.on_conflict == "raise" or time.monotonic() + delay > deadline:
            msg = f"{store_key!r} is being run by another call; retry later with the same key"
            raise InProgressError(msg, retry_after=decision.retry_after)
        return _WAIT


_WAIT: Any = object()


def _return_type(fn: Callable[..., Any]) -> Any:
    """The return annotation of *fn*, evaluated (alone: parameters may name types imported for checkers only)."""
    target = inspect.unwrap(fn)
    annotation = getattr(target, "__annotations__", {}).get("return", Any)
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, getattr(target, "__globals__", {}), inspect.getclosurevars(target).nonlocals)
        except Exception as exc:
            msg = (
                f"cannot resolve the return annotation {annotation!r} of {fn!r} ({exc}), so its stored results "
                "could not be rebuilt as that type: define the type at module level"
            )
            raise ConfigurationError(msg) from exc
    return annotation


def _namespace(fn: Callable[..., Any], namespace: str | None) -> str:
    if namespace is not None:
        if not namespace:
            raise ConfigurationError("namespace must not be empty")
        return namespace
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        msg = f"{fn!r} has no __module__ and __qualname__ to name its keys by: pass namespace="
        raise ConfigurationError(msg)
    return f"{module}.{qualname}"


def _check_store(store: object) -> None:
    if not callable(getattr(store, "claim", None)):
        msg = f"store must be a Store, a SyncStore or a store URL, not {store!r}"
        raise ConfigurationError(msg)


def _async_store(store: Store | SyncStore | str) -> Store:
    if isinstance(store, str):
        return store_from_url(store)
    _check_store(store)
    if not inspect.iscoroutinefunction(store.claim):
        msg = f"{store!r} is a blocking store; a coroutine function needs an async Store (or a store URL)"
        raise ConfigurationError(msg)
    return cast(Store, store)


def _sync_store(store: Store | SyncStore | str) -> SyncStore:
    if isinstance(store, str):
        return sync_store_from_url(store)
    _check_store(store)
    if not inspect.iscoroutinefunction(store.claim):
        return cast(SyncStore, store)
    to_sync = getattr(store, "sync", None)
    if not callable(to_sync):
        msg = f"{store!r} is an async store without .sync(); a plain function needs a SyncStore (or a store URL)"
        raise ConfigurationError(msg)
    sync_store: SyncStore = to_sync()
    return sync_store


def idempotent(
    store: Store | SyncStore | str,
    *,
    key: str | Callable[..., str],
    ttl: float = 86_400,
    lease: float = 30,
    on_conflict: Literal["raise", "wait"] = "raise",
    wait_timeout: float = 30,
    serializer: Serializer | None = None,
    namespace: str | None = None,
    unknown_outcome_ttl: float | None = None,
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Run the decorated function once per key; a repeat returns the stored result without running it.

    Works on plain functions and on coroutine functions; the decorated function keeps its signature.

    Args:
        store: an async :class:`~idempo.Store`, a :class:`~idempo.stores.SyncStore`, or a store URL. A coroutine
            function needs an async store; a plain function a sync one (a built-in async store is turned into
            its blocking twin with ``.sync()``, sharing its records). A URL opens a store for this function
            alone, never closed: to share connections between functions, open one store and pass it to each.
            A plain function never needs an event loop; called from a loop's thread, it blocks that thread.
        key: a format string over the arguments (``"charge:{order_id}"``, ``"{order.id}"``), or a function
            called with the same arguments that returns the key. The store key is ``fn:<namespace>:<key>``.
        ttl: seconds the result is kept and returned to repeats.
        lease: seconds a running call holds the key without renewal; renewed every ``lease / 3`` while the
            function runs. If the process dies, a repeat runs the function again once the lease has run out.
        on_conflict: ``"raise"`` raises :class:`~idempo.InProgressError` while another call with the key runs;
            ``"wait"`` polls the store (with backoff) for up to *wait_timeout* seconds, then returns the stored
            result, or runs the function if the other call failed (``InProgressError`` if it takes longer).
        wait_timeout: the longest wait with ``on_conflict="wait"``.
        serializer: how the result is stored; :class:`JSONSerializer` by default.
        namespace: the middle part of the store key; the function's ``module.qualname`` by default. Keep it
            stable across renames (and colon-free, so that it cannot run into another namespace's keys).
        unknown_outcome_ttl: how long a key stays in the "outcome unknown" state (the function raised
            :class:`~idempo.OutcomeUnknownError` or called :func:`~idempo.mark_outcome_unknown`), repeats raising
            ``OutcomeUnknownError``, in seconds; ``ttl`` by default. After it, a repeat runs the function again.

    Raises (from the decorated function):
        KeyReuseError: the key was first used with different arguments.
        InProgressError: another call with the key is running (``retry_after`` is the rest of its lease).
        ResponseNotStoredError: the function ran before, but its result was not stored (it could not be
            serialised, or the store was full): it is not run again.
        OutcomeUnknownError: whether an earlier call took effect is unknown (see *unknown_outcome_ttl*).
        StoreError: the store failed. If it fails even to record that the function ran (its result, or the
            small "not stored" marker), the function *has* run: its key stays claimed until the lease runs out,
            after which a repeat runs it again.
    """
    if ttl <= 0 or lease <= 0:
        msg = f"ttl and lease must be positive (ttl={ttl}, lease={lease})"
        raise ConfigurationError(msg)
    if on_conflict not in ("raise", "wait"):
        msg = f"on_conflict must be 'raise' or 'wait', not {on_conflict!r}"
        raise ConfigurationError(msg)
    if wait_timeout < 0:
        msg = f"wait_timeout must not be negative, not {wait_timeout}"
        raise ConfigurationError(msg)
    if unknown_outcome_ttl is not None and unknown_outcome_ttl <= 0:
        msg = f"unknown_outcome_ttl must be positive, not {unknown_outcome_ttl}"
        raise ConfigurationError(msg)
    given_key: object = key
    if not isinstance(given_key, str) and not callable(given_key):
        msg = f"key must be a format string or a callable, not {type(given_key).__qualname__}"
        raise ConfigurationError(msg)
    chosen_serializer = JSONSerializer() if serializer is None else serializer

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            msg = f"@idempotent cannot store what a generator yields: {fn!r}"
            raise ConfigurationError(msg)
        spec = _Spec(
            fn,
            key=key,
            ttl=ttl,
            lease=lease,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            serializer=chosen_serializer,
            namespace=_namespace(fn, namespace),
            unknown_outcome_ttl=ttl if unknown_outcome_ttl is None else unknown_outcome_ttl,
        )
        if inspect.iscoroutinefunction(fn):
            async_store = _async_store(store)
            coroutine_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await _call_async(spec, async_store, coroutine_fn, args, kwargs)

            return cast(Callable[P, T], async_wrapper)

        sync_store = _sync_store(store)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return cast(T, _call_sync(spec, sync_store, fn, args, kwargs))

        return sync_wrapper

    return decorate


# -- coroutine functions -----------------------------------------------------------------------------------------


async def _call_async(
    spec: _Spec, store: Store, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    store_key, fingerprint = spec.prepare(args, kwargs)
    claim = await store.claim(store_key, fingerprint, lease=spec.lease, ttl=spec.ttl)
    deadline = time.monotonic() + spec.wait_timeout
    delay = _WAIT_POLL_FIRST
    while not isinstance(claim, Acquired):
        answer = spec.existing(claim, store_key, fingerprint, deadline, delay)
        if answer is not _WAIT:
            return answer
        await asyncio.sleep(delay)
        delay = min(delay * 2, _WAIT_POLL_MAX)
        claim = await store.claim(store_key, fingerprint, lease=spec.lease, ttl=spec.ttl)
    token = claim.token
    report = OutcomeReport.open()
    renewal = _AsyncRenewal(store, store_key, token, spec.lease)
    try:
        try:
            result = await fn(*args, **kwargs)
        finally:
            renewal.stop()
            report.close()
    except BaseException as exc:
        if isinstance(exc, OutcomeUnknownError) or report.unknown:
            report.mark_unknown()
            await _complete_async(store, store_key, token, *spec.outcome(store_key, None, report))
            raise
        try:
            await store.release(store_key, token)
        except Exception as release_error:  # noqa: BLE001 - the function's own exception matters more
            logger.error("idempo: could not release %r after its function failed (%s)", store_key, release_error)
        raise
    await _complete_async(store, store_key, token, *spec.outcome(store_key, result, report))
    return result


async def _complete_async(store: Store, store_key: str, token: str, payload: bytes, ttl: float) -> None:
    """Complete *store_key* with *payload*, or, if the store refuses it, with its :func:`fallback`."""
    try:
        done = await store.complete(store_key, token, payload, ttl=ttl)
    except StoreFullError as exc:
        smaller = fallback(payload, 0)
        if smaller is None:
            raise
        logger.error("idempo: could not store the result of %r (%s); storing that it ran instead", store_key, exc)
        done = await store.complete(store_key, token, smaller, ttl=ttl)
    if not done:
        logger.warning("idempo: %r finished after its key was taken over; its result is not stored", store_key)


# Renewal tasks that were stopped during a renewal, kept until it is over (the loop holds tasks only weakly).
_finishing: set[asyncio.Task[None]] = set()


class _AsyncRenewal:
    """A task that renews one call's lease every ``lease / 3`` seconds until stopped. Never cancelled during a
    renewal (a store's connection must not be left halfway through a round trip): stopped then, it finishes it."""

    __slots__ = ("lease", "renewing", "stopped", "store", "store_key", "task", "token")

    def __init__(self, store: Store, store_key: str, token: str, lease: float) -> None:
        self.store = store
        self.store_key = store_key
        self.token = token
        self.lease = lease
        self.renewing = False
        self.stopped = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        period = self.lease / 3
        while True:
            await asyncio.sleep(period)
            self.renewing = True
            try:
                owned = await self.store.renew(self.store_key, self.token, lease=self.lease)
            except Exception as exc:  # noqa: BLE001 - a failed renewal is tried again at the next period
                logger.warning("idempo: could not renew the lease of %r: %s", self.store_key, exc)
                owned = True
            finally:
                self.renewing = False
            if self.stopped:
                return
            if not owned:
                logger.warning(
                    "idempo: %r lost its key while running (its lease ran out and it was taken over)", self.store_key
                )
                return

    def stop(self) -> None:
        """Stop renewing (at once if no renewal is under way; else once it is over)."""
        self.stopped = True
        if self.renewing:
            _finishing.add(self.task)
            self.task.add_done_callback(_finishing.discard)
        else:
            self.task.cancel()


# -- plain functions ---------------------------------------------------------------------------------------------


def _call_sync(
    spec: _Spec, store: SyncStore, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    store_key, fingerprint = spec.prepare(args, kwargs)
    claim = store.claim(store_key, fingerprint, lease=spec.lease, ttl=spec.ttl)
    deadline = time.monotonic() + spec.wait_timeout
    delay = _WAIT_POLL_FIRST
    while not isinstance(claim, Acquired):
        answer = spec.existing(claim, store_key, fingerprint, deadline, delay)
        if answer is not _WAIT:
            return answer
        time.sleep(delay)
        delay = min(delay * 2, _WAIT_POLL_MAX)
        claim = store.claim(store_key, fingerprint, lease=spec.lease, ttl=spec.ttl)
    token = claim.token
    report = OutcomeReport.open()
    renewal = _SyncRenewal(store, store_key, token, spec.lease)
    try:
        try:
            result = fn(*args, **kwargs)
        finally:
            renewal.stop()
            report.close()
    except BaseException as exc:
        if isinstance(exc, OutcomeUnknownError) or report.unknown:
            report.mark_unknown()
            _complete_sync(store, store_key, token, *spec.outcome(store_key, None, report))
            raise
        try:
            store.release(store_key, token)
        except Exception as release_error:  # noqa: BLE001 - as in _call_async
            logger.error("idempo: could not release %r after its function failed (%s)", store_key, release_error)
        raise
    _complete_sync(store, store_key, token, *spec.outcome(store_key, result, report))
    return result


def _complete_sync(store: SyncStore, store_key: str, token: str, payload: bytes, ttl: float) -> None:
    """:func:`_complete_async`, blocking."""
    try:
        done = store.complete(store_key, token, payload, ttl=ttl)
    except StoreFullError as exc:
        smaller = fallback(payload, 0)
        if smaller is None:
            raise
        logger.error("idempo: could not store the result of %r (%s); storing that it ran instead", store_key, exc)
        done = store.complete(store_key, token, smaller, ttl=ttl)
    if not done:
        logger.warning("idempo: %r finished after its key was taken over; its result is not stored", store_key)


class _SyncRenewal:
    """A daemon thread that renews one call's lease every ``lease / 3`` seconds until stopped."""

    __slots__ = ("lease", "lost", "stopped", "store", "store_key", "thread", "token")

    def __init__(self, store: SyncStore, store_key: str, token: str, lease: float) -> None:
        self.store = store
        self.store_key = store_key
        self.token = token
        self.lease = lease
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"idempo-renew {store_key}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        period = self.lease / 3
        while not self.stopped.wait(period):
            try:
                owned = self.store.renew(self.store_key, self.token, lease=self.lease)
            except Exception as exc:  # noqa: BLE001 - tried again at the next period
                logger.warning("idempo: could not renew the lease of %r: %s", self.store_key, exc)
                continue
            if not owned:
                if not self.stopped.is_set():
                    logger.warning(
                        "idempo: %r lost its key while running (its lease ran out and it was taken over)",
                        self.store_key,
                    )
                return

    def stop(self) -> None:
        """Stop renewing; returns once no renewal is under way."""
        self.stopped.set()
        self.thread.join()
