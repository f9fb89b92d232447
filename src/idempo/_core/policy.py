"""The policy: every option of the contract, with its default and its validation, once.

The ASGI middleware, the decorator and ``idempo proxy`` each hold one :class:`Policy`; none of them repeats a
default, a bound or a check. A policy is frozen and checked when it is made (:class:`~idempo.ConfigurationError`),
so that a face can trust every value it reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypedDict, cast

from .errors import ConfigurationError
from .fingerprint import CANONICAL_JSON_MAX_BYTES
from .problem import DEFAULT_PROBLEM_BASE

__all__ = ["DEFAULT_METHODS", "Policy", "PolicyOptions", "option_doc", "renewal_period"]

DEFAULT_METHODS: Final = ("POST", "PUT", "PATCH", "DELETE")
"""The methods protected by default (a policy keeps them as a frozenset)."""
_MIB: Final = 1024 * 1024


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What the contract does, for one middleware, decorated function or proxy. Frozen; checked when made.

    Every field is also a keyword option of :class:`~idempo.IdempotencyMiddleware` (and, where it applies, of
    ``@idempotent`` and of ``idempo proxy``), with the same name and default.

    Raises:
        ConfigurationError: a value out of its range, or a choice that is not one of its choices.
    """

    ttl: float = field(default=86_400, metadata=_doc("Seconds a completed response is kept and replayed."))
    lease: float = field(
        default=30,
        metadata=_doc(
            "Seconds an in-progress claim is honoured without renewal; renewed every lease/3 while the operation "
            "runs. If the process dies, a retry runs again once the lease has run out."
        ),
    )
    header: str = field(default="Idempotency-Key", metadata=_doc("The request header that carries the key."))
    methods: Collection[str] = field(
        default=DEFAULT_METHODS, metadata=_doc("The protected methods; others pass through untouched.")
    )
    require_key: bool | Callable[[str], bool] = field(
        default=False,
        metadata=_doc("True to answer 400 to protected requests without a key, or a predicate over the path."),
    )
    canonical_json: bool = field(
        default=False,
        metadata=_doc("Fingerprint JSON bodies in canonical form (key order and whitespace do not count)."),
    )
    canonical_json_max_bytes: int = field(
        default=CANONICAL_JSON_MAX_BYTES,
        metadata=_doc("The largest body put in canonical form; larger ones are fingerprinted as sent."),
    )
    on_conflict: Literal["reject", "wait"] = field(
        default="reject",
        metadata=_doc("While the first request runs: 'reject' (409) or 'wait' for it (bounded) and replay it."),
    )
    wait_timeout: float = field(default=30, metadata=_doc("The longest wait with on_conflict='wait', in seconds."))
    on_store_error: Literal["fail_closed", "fail_open"] = field(
        default="fail_closed",
        metadata=_doc("When the store fails: 'fail_closed' (503) or 'fail_open' (run unprotected, logged)."),
    )
    retry_after: int = field(default=1, metadata=_doc("Retry-After seconds of a 503, and the longest of a 409."))
    max_request_bytes: int = field(
        default=10 * _MIB, metadata=_doc("The largest keyed request body (buffered to be fingerprinted); 413 above.")
    )
    max_response_bytes: int = field(
        default=10 * _MIB,
        metadata=_doc("The largest response recorded; a larger one reaches the client whole, retries get a 410."),
    )
    unknown_outcome_ttl: float | None = field(
        default=None,
        metadata=_doc(
            "Seconds a key whose outcome is unknown stays taken (retries get 503 outcome-unknown); ttl if unset."
        ),
    )
    store_server_errors: bool = field(default=False, metadata=_doc("Keep and replay 5xx responses, as Stripe does."))
    replay_set_cookie: bool = field(default=False, metadata=_doc("Replay Set-Cookie headers too."))
    problem_base_uri: str = field(
        default=DEFAULT_PROBLEM_BASE, metadata=_doc("The prefix of the type URI of the problem documents.")
    )
    cache_size: int = field(
        default=0, metadata=_doc("Completed responses kept in this process and replayed without the store; 0: off.")
    )
    cache_ttl: float = field(default=60, metadata=_doc("The longest a response stays in that cache, in seconds."))
    startup_check: Literal["fail", "warn", "off"] = field(
        default="fail",
        metadata=_doc(
            "At the application's start-up (the ASGI lifespan; when a WSGI face, Django's or Flask's is built), "
            "ask the store once: 'fail' stops the start-up with a clear message if it does not answer, 'warn' logs "
            "it and starts anyway, 'off' does not ask."
        ),
    )

    def __post_init__(self) -> None:
        _check(self)
        methods: object = self.methods  # any collection of names is accepted, and kept as a frozenset
        if isinstance(methods, str):  # "POST" would otherwise become {"P", "O", "S", "T"}
            methods = (methods,)
        object.__setattr__(self, "methods", frozenset(str(method).upper() for method in cast(Collection[str], methods)))

    @property
    def header_name(self) -> bytes:
        """The key header as ASGI spells header names (lower-case bytes)."""
        return self.header.lower().encode("latin-1")

    @property
    def kept_unknown_for(self) -> float:
        """How long a key whose outcome is unknown stays taken: ``unknown_outcome_ttl``, or ``ttl``."""
        return self.ttl if self.unknown_outcome_ttl is None else self.unknown_outcome_ttl

    def key_required(self, path: str) -> bool:
        """Whether a protected request to *path* without a key is refused (``require_key``)."""
        required = self.require_key
        return required is True or (callable(required) and bool(required(path)))

    def with_options(self, **options: Any) -> Policy:
        """This policy with some options changed (checked again)."""
        return dataclasses.replace(self, **options) if options else self


class PolicyOptions(TypedDict, total=False):
    """The keyword options of a face, by name: the fields of :class:`Policy` (so that ``**options`` is typed)."""

    ttl: float
    lease: float
    header: str
    methods: Collection[str]
    require_key: bool | Callable[[str], bool]
    canonical_json: bool
    canonical_json_max_bytes: int
    on_conflict: Literal["reject", "wait"]
    wait_timeout: float
    on_store_error: Literal["fail_closed", "fail_open"]
    retry_after: int
    max_request_bytes: int
    max_response_bytes: int
    unknown_outcome_ttl: float | None
    store_server_errors: bool
    replay_set_cookie: bool
    problem_base_uri: str
    cache_size: int
    cache_ttl: float
    startup_check: Literal["fail", "warn", "off"]


def renewal_period(lease: float) -> float:
    """How often a running operation's lease is renewed: three times per lease, so that a renewal lost to a store's
    hiccup still leaves a third of the lease for the next one (and a lease has at least two thirds left whenever the
    operation ends)."""
    return lease / 3


def option_doc(name: str) -> str:
    """The one-line description of the option *name* (for help texts), with its default."""
    for option in dataclasses.fields(Policy):
        if option.name == name:
            default = option.default
            shown = ",".join(default) if isinstance(default, tuple) else default
            doc: str = option.metadata["doc"]
            return doc if default is None or default is False else f"{doc} (default {shown})"
    msg = f"no option {name!r}"
    raise KeyError(msg)


_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "on_conflict": ("reject", "wait"),
    "on_store_error": ("fail_closed", "fail_open"),
    "startup_check": ("fail", "warn", "off"),
}
_POSITIVE: Final = ("ttl", "lease")
_NOT_NEGATIVE: Final = (
    "wait_timeout",
    "retry_after",
    "max_request_bytes",
    "max_response_bytes",
    "canonical_json_max_bytes",
    "cache_size",
    "cache_ttl",
)


def _check(policy: Policy) -> None:
    for name, choices in _CHOICES.items():
        value = getattr(policy, name)
        if value not in choices:
            _refuse(name, value, f"expected one of {', '.join(choices)}")
    for name in _POSITIVE:
        if not getattr(policy, name) > 0:
            _refuse(name, getattr(policy, name), "must be positive")
    if policy.unknown_outcome_ttl is not None and not policy.unknown_outcome_ttl > 0:
        _refuse("unknown_outcome_ttl", policy.unknown_outcome_ttl, "must be positive")
    for name in _NOT_NEGATIVE:
        if not getattr(policy, name) >= 0:
            _refuse(name, getattr(policy, name), "must not be negative")
    header = policy.header
    if not header or not header.isascii() or any(char in header for char in ' \t:()<>@,;\\"/[]?={}'):
        _refuse("header", header, "must be a header name")
    if not policy.methods:
        _refuse("methods", policy.methods, "must name at least one method")
    required: object = policy.require_key
    if not (isinstance(required, bool) or callable(required)):
        _refuse("require_key", required, "must be True, False or a predicate over the path")


def _refuse(name: str, value: object, what: str) -> NoReturn:
    msg = f"{name}={value!r}: {what}"
    raise ConfigurationError(msg)
