"""The Redis store's check of the server's eviction policy (the ``eviction=`` option of the Redis stores). Strictly
private: the I/O is the store's (``redis.py``), this module reads the replies and decides.

Why. When Redis reaches ``maxmemory`` under a policy that evicts (``volatile-*``, ``allkeys-*``), it drops keys
silently to make room, and every record has a TTL, so even the ``volatile-*`` policies take records: a retry of an
evicted key finds nothing and runs its operation a second time. ``volatile-lru`` is the default of ElastiCache,
Memorystore and Azure Cache. Only ``noeviction`` keeps records (writes are refused instead, and a refused claim is a
503 that a retry survives), and so does any policy with ``maxmemory 0`` (no limit: nothing is ever evicted).

How. A check reads ``CONFIG GET maxmemory*`` on the server, or on every primary of a cluster; where ``CONFIG`` is
disabled (managed Redis) or not allowed, ``INFO memory``'s ``maxmemory`` and ``maxmemory_policy``. It is a plan
(see :mod:`idempo._core.plans`): a generator that yields the requests and receives their replies, run by the async
store and the sync twin alike. A :class:`Guard` keeps what the last check found: a store checks before its first
claim, again a second after a refusal (an operator may fix the setting with ``CONFIG SET`` while the service runs),
and a minute after a pass (a failover or a ``CONFIG SET`` may change it), so that the per-claim cost is one clock
read. Only ``claim`` is guarded: renewing, completing or releasing a claim already taken must still go through (a result
not recorded would make the retry run again), and reading records (``get``, ``scan``) starts nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from .._core.errors import ConfigurationError, StoreError

__all__ = [
    "DEFAULT_EVICTION",
    "EVICTION_MODES",
    "ConfigGet",
    "Eviction",
    "Guard",
    "InfoMemory",
    "Reading",
    "check_mode",
    "readings_plan",
]

logger = logging.getLogger("idempo")

Eviction: TypeAlias = Literal["refuse", "warn", "ignore"]
EVICTION_MODES: Final[tuple[Eviction, ...]] = ("refuse", "warn", "ignore")
DEFAULT_EVICTION: Final[Eviction] = "refuse"

RECHECK_REFUSED = 1.0
"""Seconds before a refused store reads the policy again; until then its claims fail at once, with no round trip."""
RECHECK_PASSED = 60.0
"""Seconds before a store whose server passed reads the policy again (one claim then pays the round trips)."""

_SAFE_POLICY = "noeviction"


def check_mode(value: object) -> Eviction:
    """*value* if it is an eviction mode; else a :class:`ConfigurationError` that lists them."""
    for mode in EVICTION_MODES:
        if value == mode:
            return mode
    msg = f"eviction must be one of {', '.join(EVICTION_MODES)}, not {value!r}"
    raise ConfigurationError(msg)


# -- the check: a plan of requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigGet:
    """Request: ``CONFIG GET maxmemory*`` on *node* (``None``: the one server). The result is redis-py's reply, or
    the ``ResponseError`` the server answered (CONFIG disabled, renamed or not allowed to this user)."""

    node: Any


@dataclass(frozen=True, slots=True)
class InfoMemory:
    """Request: ``INFO memory`` on *node*. The result is redis-py's parsed reply, or the ``ResponseError``."""

    node: Any


@dataclass(frozen=True, slots=True)
class Reading:
    """What one server said: its *policy* and *maxmemory* (bytes), or why they could not be read (*failure*)."""

    node: str
    policy: str | None = None
    maxmemory: int | None = None
    failure: str | None = None

    @property
    def evicts(self) -> bool:
        """Whether the server may drop records: an evicting policy under a memory limit."""
        return self.policy is not None and self.policy != _SAFE_POLICY and bool(self.maxmemory)


def readings_plan(
    nodes: Sequence[Any], name: Callable[[Any], str], refused: type[Exception]
) -> Generator[ConfigGet | InfoMemory, Any, list[Reading]]:
    """Read the policy of each of *nodes* (``[None]`` for one server); *name* gives a node's name for messages, and
    *refused* is the server's error reply (redis-py's ``ResponseError``): a read it refuses is tried another way, or
    said. Its value is one :class:`Reading` per node."""
    readings = []
    for node in nodes:
        try:
            config = yield ConfigGet(node)
        except refused as exc:
            config = exc
        reading = _from_config(name(node), config)
        if reading.failure is not None:
            try:
                info = yield InfoMemory(node)
            except refused as exc:
                info = exc
            reading = _from_info(name(node), info, reading.failure)
        readings.append(reading)
    return readings


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _from_config(node: str, reply: Any) -> Reading:
    if isinstance(reply, Exception):
        return Reading(node, failure=f"CONFIG GET: {type(reply).__name__}: {reply}")
    values = {_text(name): _text(value) for name, value in dict(reply).items()}
    policy, maxmemory = values.get("maxmemory-policy"), _number(values.get("maxmemory"))
    if policy is None or maxmemory is None:
        return Reading(node, failure="CONFIG GET: no maxmemory-policy and maxmemory in its reply")
    return Reading(node, policy, maxmemory)


def _from_info(node: str, reply: Any, config_failure: str) -> Reading:
    if isinstance(reply, Exception):
        return Reading(node, failure=f"{config_failure}; INFO memory: {type(reply).__name__}: {reply}")
    fields: Mapping[str, Any] = reply
    policy, maxmemory = fields.get("maxmemory_policy"), _number(fields.get("maxmemory"))
    if policy is None or maxmemory is None:
        return Reading(node, failure=f"{config_failure}; INFO memory: no maxmemory_policy and maxmemory in it")
    return Reading(node, _text(policy), maxmemory)


# -- what the readings mean ------------------------------------------------------------------------------------------


def problems(readings: Sequence[Reading]) -> str | None:
    """What is wrong with the servers, for a message; ``None`` if every one keeps its records."""
    evicting = [r for r in readings if r.evicts]
    unread = [r for r in readings if r.failure is not None]
    if not evicting and not unread:
        return None
    said = [f"{r.node} runs maxmemory-policy {r.policy} with maxmemory {r.maxmemory} bytes" for r in evicting]
    said += [f"the eviction policy of {r.node} could not be read ({r.failure})" for r in unread]
    advice = []
    if evicting:
        advice.append(
            "under an evicting policy Redis drops records silently when it reaches maxmemory, and the retry of a "
            "dropped key runs its operation a second time: set `maxmemory-policy noeviction` on the server "
            "(CONFIG SET maxmemory-policy noeviction, or your provider's parameter group), or maxmemory 0"
        )
    if unread:
        advice.append(
            "let the store's Redis user run CONFIG GET or INFO (e.g. ACL SETUSER <user> +info), or open the store "
            "with eviction='ignore' once you know the server runs with maxmemory-policy noeviction or maxmemory 0"
        )
    return "; ".join(said) + ". To fix: " + "; ".join(advice)


class Guard:
    """What the last check of one store found, and when to check again. Strictly private.

    Threads and tasks read and write it without a lock: the worst a race does is one check more."""

    __slots__ = ("checked_at", "mode", "refusal", "warned", "where")

    def __init__(self, mode: Eviction, where: str) -> None:
        self.mode = mode
        self.where = where
        self.refusal: str | None = None  # the message of the current refusal
        # time.monotonic() of the last check (or of the claim that took the next one); -inf: none has finished
        # yet; +inf: never check (mode "ignore").
        self.checked_at = math.inf if mode == "ignore" else -math.inf
        self.warned = False

    def blocks(self) -> bool:
        """Whether a claim must stop at :meth:`due` first (the hot path: one clock read)."""
        return self.refusal is not None or time.monotonic() - self.checked_at >= RECHECK_PASSED

    def due(self) -> bool:
        """Whether to check now; if not, raises the current refusal, if any. Once a check has finished, the next
        one is taken by whoever comes first, and meanwhile the others keep its verdict; before that, every claim
        checks (none may go ahead unchecked)."""
        now = time.monotonic()
        if now - self.checked_at < (RECHECK_REFUSED if self.refusal is not None else RECHECK_PASSED):
            if self.refusal is not None:
                raise self.refused()
            return False
        if self.checked_at != -math.inf:
            self.checked_at = now
        return True

    def refused(self) -> StoreError:
        """The error of the current refusal."""
        assert self.refusal is not None
        return StoreError(self.refusal)

    def settle(self, readings: Sequence[Reading]) -> None:
        """Take the check's *readings*. Raises the refusal (mode ``refuse``), or logs one warning per store
        (``warn``)."""
        found = problems(readings)
        self.checked_at = time.monotonic()
        if found is None or self.mode != "refuse":
            self.refusal = None
            if found is not None and not self.warned:
                self.warned = True
                logger.warning(
                    "idempo: Redis store %s (eviction='warn', claims go ahead): %s. Or open the store with "
                    "eviction='ignore' to silence this warning.",
                    self.where,
                    found,
                )
            return
        self.refusal = (
            f"Redis store {self.where}: claim refused: {found}; the store checks again within "
            f"{RECHECK_REFUSED:g} s. To run anyway, open the store with eviction='warn' or eviction='ignore' "
            "(?eviction=warn in the URL)."
        )
        raise self.refused()
