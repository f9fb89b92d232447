"""What the Redis stores share: the Lua scripts, the layout of a record, and every operation written once as a plan
(see :mod:`idempo._core.plans`): what it sends, in which order, and what the replies mean. Strictly private (see
``redis.py``'s docstring).

A plan yields effects (a script, a command, a page of ``SCAN``, the eviction check's reads) and receives their
replies; :func:`send` sends one on a sync client (its reply) or on an asyncio one (an awaitable of it), so that the
async store and its sync twin differ only in whether they await it. Each operation's plan is wrapped by
:func:`operation`, which turns redis-py's failures into :class:`~idempo.StoreError` naming the operation.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, TypeVar

from .._core.records import Acquired, Claim, Existing, Record, State, new_token
from ._redis_client import errors, store_error
from ._redis_eviction import ConfigGet, Guard, InfoMemory, Reading, readings_plan
from ._scan import ScanPlan, check_limit, glob_prefix

__all__ = [
    "OOM_PAYLOAD_LIMIT",
    "Command",
    "Fetch",
    "LoadScript",
    "Lua",
    "Nodes",
    "ScanKeys",
    "Script",
    "WithoutFlags",
    "claim_plan",
    "delete_plan",
    "fenced_plan",
    "get_plan",
    "operation",
    "scan_plan",
    "script_table",
    "send",
]

_T = TypeVar("_T")
logger = logging.getLogger("idempo")

_SCRIPTS = ("claim", "renew", "complete", "release")
_AT_OOM = ("renew", "complete")  # each also as "<name>_at_oom": its script headed by _ALLOW_OOM
_ALLOW_OOM = "#!lua flags=allow-oom\n"
_NO_FLAGS = "Error compiling script"  # what a server without script flags (Redis 6) answers to a shebang
OOM_PAYLOAD_LIMIT: Final = 64
"""A ``complete`` whose payload is at most this many bytes is written even when the server is at ``maxmemory``
(``noeviction``): the record then grows by a few dozen bytes at most (it loses its 32-byte token), and keeps
Redis's compact hash encoding (``hash-max-listpack-value`` is 64 by default). Larger payloads fail there, so that
their caller records a marker instead."""
_FIELDS = ("state", "fingerprint", "token", "created_at", "lease_expires_at", "expires_at", "payload")
_STATES = {b"in_progress": State.IN_PROGRESS, b"completed": State.COMPLETED}
_SCAN_COUNT = 200  # SCAN's COUNT hint: keys looked at per SCAN call, and so at most records per pipeline


@cache
def _script(name: str) -> str:
    return (importlib.resources.files("idempo.stores") / "lua" / f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Lua:
    """One of the store's scripts: its text, and the SHA1 digest that ``EVALSHA`` names it by."""

    source: str
    sha: str


@cache
def _lua(source: str) -> Lua:
    return Lua(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


def script_table() -> dict[str, Lua]:
    """The store's scripts for one client, each under its name, and the variants that may write at maxmemory under
    ``<name>_at_oom`` (a client of a server without script flags swaps those for the plain ones: see
    :class:`WithoutFlags`). The server loads a script when it is first run (:func:`_evalsha`)."""
    scripts = {name: _lua(_script(name)) for name in _SCRIPTS}
    for name in _AT_OOM:
        scripts[f"{name}_at_oom"] = _lua(_ALLOW_OOM + _script(name))
    return scripts


def _ms(seconds: float) -> int:
    """Whole milliseconds, as the scripts and ``PEXPIREAT`` count them."""
    return max(0, round(seconds * 1000))


def _record(key: str, fields: Sequence[Any]) -> Record:
    """A ``Record`` from the values of ``_FIELDS``, as ``HMGET`` or the claim script return them."""
    state, fingerprint, token, created_at, lease_expires_at, expires_at, payload = fields
    return Record(
        key,
        _STATES[state],
        fingerprint.decode(),
        token.decode(),
        int(created_at) / 1000,
        int(lease_expires_at) / 1000,
        int(expires_at) / 1000,
        payload,
    )


# -- effects -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Script:
    """Effect: ``EVALSHA`` of the script *name* on *key* with *args*. The result is the script's reply, or
    redis-py's ``NoScriptError`` if the server does not have it."""

    name: str
    key: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LoadScript:
    """Effect: ``SCRIPT LOAD`` of the script *name* (on every primary of a cluster). The result is its digest."""

    name: str


@dataclass(frozen=True, slots=True)
class Command:
    """Effect: ``HMGET`` of a record's fields (*read*), or ``DEL`` of *key*. The result is redis-py's reply."""

    key: str
    read: bool


@dataclass(frozen=True, slots=True)
class WithoutFlags:
    """Effect, answered at once: the script *name* (``<op>_at_oom``) failed with *error*, which says the server
    cannot compile a shebang (Redis 6). The result is whether the client's ``*_at_oom`` scripts were then replaced
    by the plain ones for good (so that the script may be sent again: it never ran); ``False`` if they already
    were (the plain script failed to compile: not a matter of flags)."""

    name: str
    error: Exception


@dataclass(frozen=True, slots=True)
class Nodes:
    """Effect, answered at once: the nodes to scan or check. The result is ``[None]`` for one server, the primaries
    of a cluster."""


@dataclass(frozen=True, slots=True)
class ScanKeys:
    """Effect: ``SCAN cursor MATCH match COUNT batch TYPE hash`` on *node*. The result is redis-py's reply:
    ``(cursor, keys)``, or ``({node name: cursor}, keys)`` from a cluster client."""

    node: Any
    cursor: int
    match: str
    batch: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """Effect: the fields of *keys*, in one pipeline of ``HMGET``s. The result is a list of field lists."""

    keys: list[bytes]


Effect = Script | LoadScript | Command | WithoutFlags | Nodes | ScanKeys | Fetch | ConfigGet | InfoMemory
_Plan = Generator[Effect, Any, _T]


def send(client: Any, scripts: dict[str, Lua], where: str, effect: Effect) -> Any:
    """Perform *effect* on *client* (sync or async) with its *scripts*: the reply from a sync client, an awaitable
    of it from an async one, except for :class:`WithoutFlags` and :class:`Nodes`, answered at once."""
    if isinstance(effect, Script):
        return client.evalsha(scripts[effect.name].sha, 1, effect.key, *effect.args)
    if isinstance(effect, Command):
        return client.hmget(effect.key, _FIELDS) if effect.read else client.delete(effect.key)
    if isinstance(effect, WithoutFlags):
        return _without_flags(scripts, effect, where)
    if isinstance(effect, LoadScript):
        return client.script_load(scripts[effect.name].source)
    cluster = hasattr(client, "get_primaries")
    if isinstance(effect, Nodes):
        return client.get_primaries() if cluster else [None]
    if isinstance(effect, Fetch):
        pipe = client.pipeline(transaction=False)
        for key in effect.keys:
            pipe.hmget(key, _FIELDS)
        return pipe.execute()
    if not isinstance(effect, ScanKeys | ConfigGet | InfoMemory):  # pragma: no cover - no other effects
        raise TypeError(effect)
    where_to = {"target_nodes": effect.node} if cluster else {}
    if isinstance(effect, ConfigGet):
        return client.config_get("maxmemory*", **where_to)
    if isinstance(effect, InfoMemory):
        return client.info("memory", **where_to)
    return client.scan(cursor=effect.cursor, match=effect.match, count=effect.batch, _type="hash", **where_to)


def answered_at_once(effect: Effect) -> bool:
    """Whether :func:`send` answers *effect* itself, with nothing to await."""
    return type(effect) is WithoutFlags or type(effect) is Nodes


def _without_flags(scripts: dict[str, Lua], effect: WithoutFlags, where: str) -> bool:
    plain = effect.name.removesuffix("_at_oom")
    if scripts[effect.name] is scripts[plain]:
        return False
    for name in _AT_OOM:
        scripts[f"{name}_at_oom"] = scripts[name]
    logger.warning(
        "idempo: Redis store %s: the server does not take script flags (Redis < 7), so at maxmemory renewals and "
        "the small 'response not stored' marker cannot be written either (%s)",
        where,
        effect.error,
    )
    return True


# -- the operations, as plans ----------------------------------------------------------------------------------------


def operation(name: str, where: str, plan: Generator[Any, Any, _T]) -> Generator[Any, Any, _T]:
    """*plan*, whose redis-py failures become a :class:`~idempo.StoreError` (a :class:`~idempo.StoreFullError` when
    the server refused a write at ``maxmemory``) that names the operation, *name*, and the store, *where*."""
    try:
        return (yield from plan)
    except errors() as exc:
        raise store_error(where, name, exc) from exc


@cache
def _response_errors() -> tuple[type[Exception], type[Exception]]:
    """redis-py's ``ResponseError`` and ``NoScriptError`` (imported once, when first needed)."""
    from redis.exceptions import NoScriptError, ResponseError

    return ResponseError, NoScriptError


def _evalsha(name: str, key: str, args: tuple[Any, ...]) -> _Plan[Any]:
    """The script *name* on *key* with *args*, by its digest; if the server does not have it (``NOSCRIPT``: a new
    server, or after ``SCRIPT FLUSH`` or a restart), loaded and sent again. (What redis-py's ``Script`` does, less
    the imports and pipeline checks it makes on every call: about 5 µs of a command's time.)"""
    try:
        return (yield Script(name, key, args))
    except _response_errors()[1]:
        pass
    yield LoadScript(name)
    return (yield Script(name, key, args))


def _run_at_oom(name: str, key: str, args: tuple[Any, ...]) -> _Plan[Any]:
    """The script *name* (``<op>_at_oom``, which may write at maxmemory), sent again as the plain one if the server
    cannot compile its shebang."""
    try:
        return (yield from _evalsha(name, key, args))
    except _response_errors()[0] as exc:
        failure = exc
    if not (_NO_FLAGS in str(failure) and (yield WithoutFlags(name, failure))):
        raise failure
    return (yield from _evalsha(name, key, args))


def claim_plan(
    prefix: str, key: str, fingerprint: str, lease: float, ttl: float, token: str | None, guard: Guard, where: str
) -> _Plan[Claim]:
    """``claim``, after the eviction check when it is due (see ``._redis_eviction``)."""
    if guard.blocks() and guard.due():
        guard.settle((yield from _eviction_check(where)))
    if token is None:
        token = new_token()
    elif not token:
        msg = "a claim's token must not be empty (a completed record's token is empty)"
        raise ValueError(msg)
    reply = yield from _evalsha("claim", prefix + key, (fingerprint, token, _ms(lease), _ms(ttl)))
    return Acquired(token) if reply == 1 else Existing(_record(key, reply))


def fenced_plan(name: str, prefix: str, key: str, args: tuple[Any, ...]) -> _Plan[bool]:
    """``renew`` (*args*: token, lease), ``complete`` (token, payload, ttl) or ``release`` (token): ``True`` if the
    token still owned the key. ``renew`` and a ``complete`` of a small payload run the scripts that may write at
    maxmemory."""
    if name == "renew":
        token, lease = args
        args, script = (token, _ms(lease)), "renew_at_oom"
    elif name == "complete":
        token, payload, ttl = args
        args = (token, payload, _ms(ttl))
        script = "complete_at_oom" if len(payload) <= OOM_PAYLOAD_LIMIT else "complete"
    else:
        script = name
    reply = yield from (_run_at_oom if script.endswith("_at_oom") else _evalsha)(script, prefix + key, args)
    return bool(reply == 1)


def get_plan(prefix: str, key: str) -> _Plan[Record | None]:
    fields = yield Command(prefix + key, read=True)
    return None if fields[0] is None else _record(key, fields)


def delete_plan(prefix: str, key: str) -> _Plan[bool]:
    return bool((yield Command(prefix + key, read=False)) == 1)


def _eviction_check(where: str) -> _Plan[list[Reading]]:
    """The eviction check: the primaries (or the one server, named *where*), then their policies."""
    from redis.exceptions import ResponseError

    nodes = yield Nodes()
    return (yield from readings_plan(nodes, lambda node: where if node is None else node.name, ResponseError))


def scan_plan(store_prefix: str, prefix: str, limit: int | None) -> ScanPlan[Effect]:
    """``scan``: the keys under ``<store prefix><prefix>`` (taken literally), node after node, and their records.

    SCAN may return a key more than once (while Redis rehashes): a key already listed is skipped. A key that
    expired or was deleted between SCAN and HMGET, or a hash under the prefix that is not a record, is skipped."""
    check_limit(limit)
    if limit == 0:
        return
    match = glob_prefix(store_prefix + prefix)
    nodes: list[Any] = yield Nodes()
    seen: set[bytes] = set()
    listed = 0
    for node in nodes:
        cursor = 0
        while True:
            reply: tuple[Any, list[bytes]] = yield ScanKeys(node, cursor, match, _SCAN_COUNT)
            next_cursor, keys = reply
            cursor = int(next_cursor[node.name] if isinstance(next_cursor, dict) else next_cursor)
            fresh = [key for key in dict.fromkeys(keys) if key not in seen]
            seen.update(fresh)
            if fresh:
                replies: list[list[Any]] = yield Fetch(fresh)
                for raw, fields in zip(fresh, replies, strict=True):
                    record = _scanned(raw, store_prefix, fields)
                    if record is not None:
                        yield record
                        listed += 1
                        if listed == limit:
                            return
            if cursor == 0:
                break


def _scanned(raw: bytes, store_prefix: str, fields: Sequence[Any]) -> Record | None:
    """The record of Redis key *raw*, from its ``HMGET`` fields; ``None`` if it is gone or not a record."""
    if fields[0] not in _STATES or any(value is None for value in fields[1:6]):
        return None
    try:
        key = raw.decode()
    except UnicodeDecodeError:
        return None  # not written by a store: store keys are str
    return _record(key[len(store_prefix) :], fields)
