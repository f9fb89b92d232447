"""A keyed request's response recorded inside the application's own database transaction: what the faces, the SQL
stores and the bindings (:mod:`idempo.transactions`) share. Sans-I/O; strictly private.

The gap it closes: a handler commits its business rows, then the process dies before the face records the
response in the store; the lease runs out and a retry runs the operation again. When the store's table is in the
application's database, the handler (or the Django middleware, for it) runs the store's *fenced completion* -- the
very ``UPDATE ... WHERE key = ? AND token = ? AND state = in progress`` that completes a key -- on its own
connection, inside its own transaction: the business rows and the completed record commit together, or neither does.

The pieces:

* a SQL store describes where its records live and how to complete one as a :class:`Target` (its dialect, which
  database, the statement with named parameters, its clock);
* a face, for each key it claims, hangs a :class:`Bound` on the request's outcome report (:mod:`.outcome`), so that
  code running in the request's context finds it (:func:`current`) at no cost to requests that never look;
* a binding asks the :class:`Bound` for the statement and its parameters (:meth:`Bound.completion`), runs it in the
  application's transaction, and reports the row count (:meth:`Bound.recorded`): one row, or the key is no longer
  this request's and the transaction must not commit (:class:`~idempo.KeyTakenOverError`). Where the binding can see
  the commit (SQLAlchemy's ``after_commit``, Django's ``on_commit``), it says so (:meth:`Bound.committed`), and the
  face does not call the store at all; otherwise the face completes the key as usual, and a key found completed
  already is the transaction's commit, not a lost key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, NamedTuple

from .decide import record_for, should_store
from .errors import KeyTakenOverError, NotClaimedError, WrongDatabaseError
from .outcome import current as current_report
from .policy import Policy

__all__ = [
    "COMMITTED",
    "OPEN",
    "RECORDED",
    "Bound",
    "Target",
    "current",
    "pyformat",
    "response_parts",
    "same_host",
]

OPEN: Final = 0  # nothing recorded in a transaction
RECORDED: Final = 1  # the completion ran in a transaction whose commit no one saw (it may have rolled back)
COMMITTED: Final = 2  # ... and that transaction committed: the key is complete

Dialect = Literal["postgresql", "sqlite"]


class Target(NamedTuple):
    """Where a SQL store keeps its records, and how a transaction of the application's completes one."""

    dialect: Dialect
    identity: tuple[str, ...]
    """PostgreSQL: ``(host, port, dbname)``, as libpq would resolve them; SQLite: ``(absolute path,)``."""
    statement: str
    """The fenced completion, with named parameters ``:key``, ``:token``, ``:payload``, ``:ttl`` and ``:now``."""
    now: Callable[[], float | None]
    """The store's clock; ``None``: the database server's (the statement reads it)."""
    display: str
    """The store, as its ``repr`` shows it (in error messages)."""


class Bound:
    """The claim a running keyed request holds, as the bindings see it. One per keyed request, made by its face."""

    __slots__ = ("head", "payload", "policy", "state", "store", "store_key", "target", "token", "ttl")

    def __init__(
        self, policy: Policy, store: object, target: Target | None, store_key: str, token: str, *, head: bool = False
    ) -> None:
        self.policy = policy
        self.store = store
        self.target = target
        self.store_key = store_key
        self.token = token
        self.head = head
        self.state = OPEN
        self.payload: bytes | None = None
        self.ttl = 0.0

    def require(self, dialect: str, identity: tuple[str, ...]) -> Target:
        """The store's target, if the application's connection (*dialect*, *identity*) is on its database."""
        target = self.target
        if target is None:
            msg = (
                f"the store {self.store!r} cannot record a response in a transaction of the application's: only a "
                "PostgreSQL or SQLite store on the application's own database can (see idempo.transactions.store_for)"
            )
            raise WrongDatabaseError(msg)
        if dialect != target.dialect or not _same_database(target.dialect, target.identity, identity):
            msg = (
                f"the transaction is on {dialect} database {_show(identity)}, but the store {target.display} keeps its "
                f"records in {target.dialect} database {_show(target.identity)}: point the store at the application's "
                "database (idempo.transactions.store_for), or record in a transaction on the store's"
            )
            raise WrongDatabaseError(msg)
        return target

    def completion(
        self, target: Target, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> tuple[str, dict[str, Any]] | None:
        """The statement (named parameters) and its parameters that complete the key with this response, or
        ``None`` if the response is not one that is kept (a 5xx: the key is released after the request, as usual)."""
        if self.state == COMMITTED:
            raise NotClaimedError("this request's response was recorded in a transaction that committed already")
        policy = self.policy
        report = current_report.get()
        recorded = record_for(
            policy,
            status,
            headers,
            (body,),
            size=len(body),
            failed=False,
            kept=should_store(status, store_server_errors=policy.store_server_errors),
            too_large=len(body) > policy.max_response_bytes,
            unknown=report is not None and report.unknown,
            head=self.head,
        )
        if recorded.payload is None:
            return None
        self.payload, self.ttl = recorded.payload, recorded.ttl
        params = {
            "key": self.store_key,
            "token": self.token,
            "payload": recorded.payload,
            "ttl": float(recorded.ttl),
            "now": target.now(),
        }
        return target.statement, params

    def recorded(self, rowcount: int) -> None:
        """The completion ran in the application's transaction and touched *rowcount* rows: one, or the key is no
        longer this request's (raises :class:`~idempo.KeyTakenOverError`, so that the transaction rolls back)."""
        if rowcount != 1:
            msg = (
                "the key of this request is no longer its own (its lease ran out and a retry took it over, or its "
                "response was recorded already): roll the transaction back"
            )
            raise KeyTakenOverError(msg)
        self.state = RECORDED

    def committed(self) -> None:
        """The transaction that recorded the response committed: the key is complete, and the face need not
        complete it."""
        if self.state == RECORDED:
            self.state = COMMITTED

    def rolled_back(self) -> None:
        """The transaction that recorded the response rolled back: the face completes the key as usual."""
        if self.state == RECORDED:
            self.state = OPEN
            self.payload = None


def current() -> Bound | None:
    """The claim of the keyed request running in this context, or ``None``."""
    report = current_report.get()
    while report is not None:
        bound = report.bound
        if bound is not None:
            return bound
        report = report.parent
    return None


# -- the statement in each driver's parameter style --------------------------------------------------------------

_NAMED: Final = re.compile(r"(?<![:\w]):(\w+)")


def pyformat(statement: str) -> str:
    """*statement*'s ``:name`` parameters as ``%(name)s`` (psycopg, and Django's cursors)."""
    return _NAMED.sub(r"%(\1)s", statement)


# -- which database -----------------------------------------------------------------------------------------------

_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1", ""})


def same_host(a: str, b: str) -> bool:
    """Whether two libpq hosts name the same server as far as the client can tell without asking it: equal, or both
    this machine (a loopback address, ``localhost``, a Unix socket directory or the default)."""
    if a == b:
        return True
    local_a = a in _LOOPBACK or a.startswith("/")
    local_b = b in _LOOPBACK or b.startswith("/")
    return local_a and local_b


def _same_database(dialect: Dialect, ours: tuple[str, ...], theirs: tuple[str, ...]) -> bool:
    if dialect == "sqlite":
        return ours == theirs
    return len(theirs) == 3 and same_host(ours[0], theirs[0]) and ours[1:] == theirs[1:]


def _show(identity: tuple[str, ...]) -> str:
    return repr(identity[0]) if len(identity) == 1 else f"{identity[2]!r} on {identity[0] or 'localhost'}:{identity[1]}"


# -- a framework's response, as status, headers and body -------------------------------------------------------------


def response_parts(response: object) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The status, headers (lower-case names, bytes) and whole body of *response*: a ``(status, headers, body)``
    tuple, or a Starlette, Django, Flask/Werkzeug (or any alike) response object whose body is known."""
    if isinstance(response, tuple):
        status, headers, body = response
        return int(status), _headers(headers.items() if isinstance(headers, Mapping) else headers), bytes(body)
    status = getattr(response, "status_code", None)
    if not isinstance(status, int):
        msg = f"cannot record {type(response).__name__!r}: give a response object or (status, headers, body)"
        raise TypeError(msg)
    if getattr(response, "streaming", False) or getattr(response, "is_streamed", False):
        msg = "a streaming response cannot be recorded in a transaction: its body is not known before it is sent"
        raise TypeError(msg)
    raw = getattr(response, "raw_headers", None)  # Starlette
    if raw is not None and isinstance(getattr(response, "body", None), bytes | bytearray | memoryview):
        return status, _headers(raw), bytes(response.body)  # type: ignore[attr-defined]
    get_data = getattr(response, "get_data", None)  # Flask, Werkzeug
    if callable(get_data):
        return status, _headers(response.headers.items()), bytes(get_data())  # type: ignore[attr-defined]
    content = getattr(response, "content", None)  # Django
    if isinstance(content, bytes):
        headers = _headers(response.items())  # type: ignore[attr-defined]
        cookies = getattr(response, "cookies", None)  # Django keeps Set-Cookie apart from the other headers
        if cookies:
            headers.extend((b"set-cookie", morsel.OutputString().encode("latin-1")) for morsel in cookies.values())
        return status, headers, content
    msg = f"a {type(response).__name__} response's body is not known before it is sent: it cannot be recorded"
    raise TypeError(msg)


def _headers(items: Iterable[tuple[Any, Any]]) -> list[tuple[bytes, bytes]]:
    return [
        (
            (name if isinstance(name, bytes) else str(name).encode("latin-1")).lower(),
            value if isinstance(value, bytes) else str(value).encode("latin-1"),
        )
        for name, value in items
    ]
