"""The outcome of the keyed operation that is running in this context, as the application reports it.

A face (the middleware, the decorator) opens a :class:`OutcomeReport` cell for each operation it runs and makes it the
current one in a context variable; the application, from anywhere in that operation's context (its handler, a
function it calls, a thread or task it starts: they inherit the context), marks it with
:func:`mark_outcome_unknown`, or by raising :class:`~idempo.OutcomeUnknownError`. The face reads the cell when it
records the outcome. Strictly private, except :func:`mark_outcome_unknown`.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .bound import Bound

__all__ = ["Claimant", "OutcomeReport", "current", "mark_outcome_unknown"]


class Claimant(Protocol):
    """**Protocol:** what holds a running request's claim and makes its :class:`~idempo._core.bound.Bound` when a
    binding first asks for it (a face's per-request object). Strictly private."""

    def bind(self) -> Bound:
        """The claim, as the transaction bindings see it."""


class OutcomeReport:
    """What the application said of one running operation. Strictly private.

    An operation run inside another (a decorated function called by a keyed request's handler) has the outer one's
    report as its *parent*: an inner outcome that is unknown makes the outer one unknown too.
    """

    __slots__ = ("_context", "claimant", "made", "parent", "unknown")

    def __init__(self, parent: OutcomeReport | None = None) -> None:
        self.unknown = False
        self.parent = parent
        # The request's claim as the transaction bindings see it (idempo._core.bound.Bound), where a face set one:
        # made (`made`) when a binding first asks (`bound`), by the face's `claimant`, or set by the face.
        self.made: Bound | None = None
        self.claimant: Claimant | None = None
        self._context: Token[OutcomeReport | None] | None = None

    @property
    def bound(self) -> Bound | None:
        """The request's claim as the bindings see it (made on first use), or ``None`` where no face set one."""
        bound = self.made
        if bound is None and self.claimant is not None:
            bound = self.made = self.claimant.bind()
        return bound

    @bound.setter
    def bound(self, bound: Bound | None) -> None:
        self.made = bound

    @classmethod
    def open(cls, claimant: Claimant | None = None) -> OutcomeReport:
        """A report for an operation about to run in this context, made the current one until :meth:`close`
        (:meth:`enter` on a new report, in one call: the middleware makes one per keyed request), its claim's
        :class:`~idempo._core.bound.Bound` made by *claimant* if a binding asks for it."""
        report = cls.__new__(cls)
        report.unknown = False
        report.made = None
        report.claimant = claimant
        report.parent = current.get()
        report._context = current.set(report)
        return report

    def enter(self) -> None:
        """Make this the current report, until :meth:`close`; the one that was current is its parent."""
        self.parent = current.get()
        self._context = current.set(self)

    def close(self) -> None:
        """The operation is over: the report that was current before :meth:`open` is current again."""
        if self._context is not None:
            current.reset(self._context)
            self._context = None

    def mark_unknown(self) -> None:
        """This operation's outcome is unknown, and so is that of every operation it runs in."""
        report: OutcomeReport | None = self
        while report is not None:
            report.unknown = True
            report = report.parent


current: ContextVar[OutcomeReport | None] = ContextVar("idempo.outcome", default=None)


def mark_outcome_unknown() -> None:
    """Say that the outcome of the running keyed operation is unknown: it may have taken effect.

    Call it from the handler of a keyed request (or from a function decorated with ``@idempotent``), or from
    anything it calls, when a call made downstream may have happened without the answer being known (a payment
    provider timed out after the request was sent, a connection broke before the reply). Whatever the handler
    then answers still reaches the client, but the key is not released (as it would be after a 5xx or an
    exception): it is kept in the "outcome unknown" state, and every retry gets a 503 ``outcome-unknown`` problem
    (``OutcomeUnknownError`` from the decorator) until the record expires (``unknown_outcome_ttl``) or an operator
    resolves it with ``idempo keys resolve``. Raising :class:`~idempo.OutcomeUnknownError` does the same.

    Outside a keyed operation it does nothing.
    """
    report = current.get()
    if report is not None:
        report.mark_unknown()
