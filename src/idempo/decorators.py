"""``@idempotent``: run a function once per key, and return its stored result to every repeat.

For job workers (Celery, RQ, arq), scripts and services that receive an idempotency key (a job id, the request's
``Idempotency-Key``) and must act on it exactly once::

    from idempo import idempotent

    @idempotent("sqlite:///idempo.db", key="charge:{order_id}")
    def charge(order_id: str, amount: int) -> Receipt: ...

Theory of operation, for one call (the same steps as the middleware's, over the same store and decision table),
written once as a plan (:mod:`idempo._core.plans`) that a blocking runner drives for a plain function and an
awaiting one for a coroutine function:

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
  share keys. A function in a module run as ``__main__`` takes the module's real name when it has one (``python -m
  pkg.jobs``: ``pkg.jobs``, as a worker that imports it sees it); run as a file or in a notebook, it has none, and
  ``namespace=`` is required (a ``ConfigurationError`` says so), since ``__main__`` would be another namespace than
  the one the same function gets where it is imported.
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

import functools
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast

from ._calls import AsyncCall, Effect, Run, Sleep, StoreCall, SyncCall
from ._core.codec import decode_value, encode_not_stored, encode_outcome_unknown, encode_value
from ._core.decide import Conflict, Mismatch, NotStored, Replay, Wait, decide, fallback, wait_or_answer
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
from ._core.plans import Plan, run, run_async
from ._core.policy import Policy
from ._core.records import Acquired, Claim
from ._serialize import JSONSerializer, Serializer, fingerprint_arguments
from .stores import Store, SyncStore, store_from_url, sync_store_from_url

__all__ = ["JSONSerializer", "Serializer", "fingerprint_arguments", "idempotent"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("idempo")

_ON_CONFLICT: Final[dict[str, Literal["reject", "wait"]]] = {"raise": "reject", "wait": "wait"}
_UNRESOLVED: Any = object()


class _Spec:
    """What one decorated function needs per call, and its call as a plan. Strictly private."""

    __slots__ = ("fn", "key", "namespace", "policy", "return_type", "serializer", "signature")

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        key: str | Callable[..., str],
        policy: Policy,
        serializer: Serializer,
        namespace: str,
    ) -> None:
        self.fn = fn
        self.key = key
        self.policy = policy
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

    def plan(self, store_key: str, fingerprint: str) -> Plan[Effect, Any]:
        """One call, from its claim to its recorded result: its return value, or what it raises."""
        policy = self.policy
        claim: Claim = yield StoreCall("claim", (store_key, fingerprint), {"lease": policy.lease, "ttl": policy.ttl})
        started = 0.0
        delay = 0.0
        while not isinstance(claim, Acquired):
            decision = decide(claim.record, fingerprint, now=time.time(), retry_after=policy.lease)
            if not isinstance(decision, Conflict):
                return self.existing(decision, store_key)
            started = started or time.monotonic()
            step = wait_or_answer(policy, decision, waited=time.monotonic() - started, delay=delay)
            if not isinstance(step, Wait):
                msg = f"{store_key!r} is being run by another call; retry later with the same key"
                raise InProgressError(msg, retry_after=decision.retry_after)
            yield Sleep(step.seconds)
            delay = step.seconds
            claim = yield StoreCall("claim", (store_key, fingerprint), {"lease": policy.lease, "ttl": policy.ttl})
        token = claim.token
        report = OutcomeReport()
        try:
            result = yield Run(token, report)
        except BaseException as exc:
            if isinstance(exc, OutcomeUnknownError) or report.unknown:
                report.mark_unknown()
                yield from self.complete(store_key, token, *self.outcome(store_key, None, report))
                raise
            try:
                yield StoreCall("release", (store_key, token), {})
            except Exception as release_error:  # noqa: BLE001 - the function's own exception matters more
                logger.error("idempo: could not release %r after its function failed (%s)", store_key, release_error)
            raise
        yield from self.complete(store_key, token, *self.outcome(store_key, result, report))
        return result

    def complete(self, store_key: str, token: str, payload: bytes, ttl: float) -> Plan[Effect, None]:
        """Complete the key with *payload*, or, if the store is full, with its :func:`~idempo._core.decide.fallback`."""
        try:
            done = yield StoreCall("complete", (store_key, token, payload), {"ttl": ttl})
        except StoreFullError as exc:
            smaller = fallback(payload, 0)
            if smaller is None:
                raise
            logger.error("idempo: could not store the result of %r (%s); storing that it ran instead", store_key, exc)
            done = yield StoreCall("complete", (store_key, token, smaller), {"ttl": ttl})
        if not done:
            logger.warning("idempo: %r finished after its key was taken over; its result is not stored", store_key)

    def outcome(self, store_key: str, result: Any, report: OutcomeReport) -> tuple[bytes, float]:
        """What to ``complete`` a call's key with, and for how long: the framed serialised *result*; or the
        "outcome unknown" marker if the function reported its outcome unknown (*report*); or, for a result that
        cannot be serialised, the "not stored" marker."""
        if report.unknown:
            logger.warning("idempo: the outcome of %r is unknown; its key is kept until resolved or expired", store_key)
            return encode_outcome_unknown(), self.policy.kept_unknown_for
        try:
            data = self.serializer.dumps(result)
        except (TypeError, ValueError) as exc:
            logger.error(
                "idempo: the result of %r cannot be serialised (%s): the key is kept done without it, and a "
                "repeat raises ResponseNotStoredError; pass serializer= to store such results",
                store_key,
                exc,
            )
            return encode_not_stored(0, "unserializable"), self.policy.ttl
        return encode_value(data), self.policy.ttl

    def existing(self, decision: Replay | Mismatch | NotStored | Any, store_key: str) -> Any:
        """What a call gets from a record it found, when it is not still running: the stored value, or an error."""
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
        raise decision.error()  # Unknown


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
    if module == "__main__":
        # Run with `python -m pkg.jobs`, the module knows its real name, the one a worker that imports it sees. Run as
        # a file (or in a notebook), it does not: `__main__` here would be another namespace, and other keys, than
        # the one the same function gets when a worker imports it.
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or not spec.name or spec.name == "__main__":
            msg = (
                f"{qualname} is defined in a script run as __main__, whose keys would not be the same when a worker "
                f"imports it: pass namespace= (e.g. namespace={qualname!r}), or run it with python -m"
            )
            raise ConfigurationError(msg)
        module = spec.name
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
    ttl: float = Policy.ttl,
    lease: float = Policy.lease,
    on_conflict: Literal["raise", "wait"] = "raise",
    wait_timeout: float = Policy.wait_timeout,
    serializer: Serializer | None = None,
    namespace: str | None = None,
    unknown_outcome_ttl: float | None = Policy.unknown_outcome_ttl,
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
    if on_conflict not in _ON_CONFLICT:
        msg = f"on_conflict must be 'raise' or 'wait', not {on_conflict!r}"
        raise ConfigurationError(msg)
    policy = Policy(
        ttl=ttl,
        lease=lease,
        on_conflict=_ON_CONFLICT[on_conflict],
        wait_timeout=wait_timeout,
        unknown_outcome_ttl=unknown_outcome_ttl,
    )
    given_key: object = key
    if not isinstance(given_key, str) and not callable(given_key):
        msg = f"key must be a format string or a callable, not {type(given_key).__qualname__}"
        raise ConfigurationError(msg)
    chosen_serializer = JSONSerializer() if serializer is None else serializer

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            msg = f"@idempotent cannot store what a generator yields: {fn!r}"
            raise ConfigurationError(msg)
        spec = _Spec(fn, key=key, policy=policy, serializer=chosen_serializer, namespace=_namespace(fn, namespace))
        if inspect.iscoroutinefunction(fn):
            async_store = _async_store(store)
            coroutine_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                store_key, fingerprint = spec.prepare(args, kwargs)
                call = AsyncCall(async_store, coroutine_fn, args, kwargs, store_key, policy.lease)
                return await run_async(spec.plan(store_key, fingerprint), call.perform)

            return cast(Callable[P, T], async_wrapper)

        sync_store = _sync_store(store)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            store_key, fingerprint = spec.prepare(args, kwargs)
            call = SyncCall(sync_store, fn, args, kwargs, store_key, policy.lease)
            return cast(T, run(spec.plan(store_key, fingerprint), call.perform))

        return sync_wrapper

    return decorate
