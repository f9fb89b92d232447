"""One keyed request through a blocking face (WSGI, Django, Flask), from its admission to its recorded outcome.
Strictly private.

:class:`Guard` is what a face holds (its policy, its :class:`~idempo.SyncStore`, its lease renewer); for each keyed
request the face reads the key, the body and the principal in its own framework's terms, and asks
:meth:`Guard.claim` for an answer. That is either a whole :class:`Answer` to send as it is (a replay, a problem), a
:class:`FailOpen` (run the app unprotected), or a :class:`Held` claim, which the face runs the app under: it tells
the claim the response's status and headers (:meth:`Held.start`), its body's chunks (:meth:`Held.chunk`) and its end
(:meth:`Held.finish`), which records the outcome before the face lets the last chunk go. Every answer is one the
decision table (:mod:`idempo._core.decide`) chose; the ASGI middleware's twin of this is
:mod:`idempo._asgi.exchange`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, Final, NamedTuple

from .._core.bound import COMMITTED, OPEN, Bound
from .._core.cache import CompletedCache
from .._core.decide import (
    MISMATCH,
    RECORD_RETRY_FIRST,
    Conflict,
    FailOpen,
    Mismatch,
    NotStored,
    Refuse,
    Replay,
    Wait,
    admit,
    body_too_large,
    decide,
    decide_cached,
    fallback,
    next_record_pause,
    on_store_failure,
    record_for,
    replay,
    should_store,
    wait_or_answer,
)
from .._core.errors import (
    InvalidKeyError,
    OutcomeUnknownError,
    RequestError,
    ResponseNotStoredError,
    StoreFullError,
)
from .._core.fingerprint import canonical_json_body, fingerprint_request, principal_digest, scoped_key
from .._core.outcome import OutcomeReport
from .._core.policy import Policy
from .._core.principal import ANONYMOUS_WARNING
from .._core.problem import Problem
from .._core.records import Acquired, Claim, State, new_token
from ..observe import Observer, Outcome, StoreOperation, tell
from ..stores import SyncStore, takes_token, transaction_target
from .leases import ThreadRenewer

__all__ = ["REPLAYED", "Answer", "FailOpen", "Guard", "Held", "RecordedStream", "finish_recording"]

logger = logging.getLogger("idempo")

REPLAYED: Final = (b"idempotent-replayed", b"true")

# The threads still recording an outcome in the background, of every blocking face of the process (finish_recording).
_recording: set[threading.Thread] = set()
_recording_lock = threading.Lock()


def finish_recording(timeout: float | None = None) -> bool:
    """Wait until the outcomes the blocking faces of this process are still recording in the background (the store
    failed to take them) are recorded, or given up on when their leases run out; at most *timeout* seconds if given.
    Return whether none is left. See :func:`idempo.wsgi.finish_recording`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _recording_lock:
            threads = [thread for thread in _recording if thread.is_alive()]
        if not threads:
            return True
        logger.warning("idempo: waiting for %d outcome(s) still being recorded", len(threads))
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() >= deadline:
            with _recording_lock:
                return not any(thread.is_alive() for thread in _recording)


class Answer(NamedTuple):
    """A whole response the face sends as it is: a replay or a problem. Header names are lower case bytes."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    outcome: Outcome


class Guard:
    """The contract of one blocking face: its policy, its store and what it keeps between requests (the cache of
    completed records, the lease renewer). Safe to share between threads (gthread workers, Django's ASGI handler).

    Args:
        store: a :class:`~idempo.SyncStore`.
        policy: the face's options.
        observer: told of each request's outcome and each store call's time, or ``None``.
    """

    def __init__(self, store: SyncStore, policy: Policy, observer: Observer | None = None) -> None:
        self.store = store
        self.policy = policy
        self.observer = observer
        self.calls: SyncStore = store if observer is None else _ObservedSyncStore(store, observer)
        self.renewer = ThreadRenewer(self.calls, policy.lease)
        self.target = transaction_target(store)
        self.claims_with_token = takes_token(store)
        self.header = policy.header_name
        self.methods = policy.methods
        self.cache = (
            CompletedCache(policy.cache_size, policy.cache_ttl) if policy.cache_size and policy.cache_ttl else None
        )
        self._cache_lock = threading.Lock()
        self._warned_anonymous = False

    # -- admission ---------------------------------------------------------------------------------------------

    def admit(self, value: str | bytes | None, path: str) -> str | Answer | None:
        """The key of a request of a protected method whose key header is *value* (``None``: absent), as
        :func:`~idempo._core.decide.admit` says: the key, ``None`` to let the request through, or the 400.

        Servers join repeated headers with commas before a blocking app sees them (PEP 3333; Django's ASGI handler
        does the same), so a comma in the value cannot be told from two keys: it is refused, as two keys are.
        """
        if value is None:
            admission = admit(self.policy, (), path)
        else:
            raw = value.encode("latin-1") if isinstance(value, str) else value
            if b"," in raw:
                return self.refuse(
                    "bad_key",
                    InvalidKeyError(
                        "send exactly one Idempotency-Key header, without a comma (repeated headers reach the "
                        "application joined by commas)"
                    ),
                )
            admission = admit(self.policy, (raw,), path)
        if type(admission) is str:
            return admission
        if isinstance(admission, Refuse):
            return self.refuse("bad_key", admission.error)
        return None

    def too_large(self, size: int, *, declared: bool) -> Answer | None:
        """The 413 of a body of *size* bytes (:func:`~idempo._core.decide.body_too_large`), or ``None``."""
        error = body_too_large(self.policy, size, declared=declared)
        return None if error is None else self.refuse("too_large", error)

    def warn_anonymous(self, principal: str | bytes) -> None:
        """Warn once that keyed requests arrive with no identity (the default principal found none)."""
        if not principal and not self._warned_anonymous:
            self._warned_anonymous = True
            logger.warning(ANONYMOUS_WARNING)

    def fingerprint(self, method: str, path: str, query: bytes, content_type: bytes, body: bytes) -> str:
        """The default fingerprint of a request (``canonical_json`` applied)."""
        policy = self.policy
        if policy.canonical_json:
            body = canonical_json_body(body, policy.canonical_json_max_bytes)
        return fingerprint_request(method, path, query, body, content_type)

    # -- answers -----------------------------------------------------------------------------------------------

    def observe(self, outcome: Outcome, request: MutableMapping[str, Any]) -> None:
        """Tell the observer, if any, what became of *request* (the WSGI environ, or the face's request)."""
        if self.observer is not None:
            tell(self.observer, outcome, request)

    def refuse(self, outcome: Outcome, error: RequestError) -> Answer:
        """The problem document of *error*, as a whole response."""
        status, headers, body = Problem.from_error(error, base_uri=self.policy.problem_base_uri).render(
            retry_after=getattr(error, "retry_after", None)
        )
        return Answer(status, headers, body, outcome)

    def unknown(self) -> Answer:
        """The 503 ``outcome-unknown`` problem of a request that said its outcome is unknown."""
        retry_after = math.ceil(self.policy.kept_unknown_for)
        error = OutcomeUnknownError.recorded("the outcome of this operation is unknown", retry_after=retry_after)
        return self.refuse("outcome_unknown", error)

    def _replay(self, store_key: str, payload: bytes) -> Answer:
        answer = replay(payload)
        if isinstance(answer, RequestError):
            if isinstance(answer, ResponseNotStoredError) and answer.reason == "unreadable":
                logger.error("idempo: the stored response of key %r cannot be decoded; retries get a 410", store_key)
            return self.refuse("replayed", answer)
        status, headers, body = answer
        headers.append(REPLAYED)
        return Answer(status, headers, body, "replayed")

    # -- the claim ---------------------------------------------------------------------------------------------

    def claim(self, key: str, principal: str | bytes, fingerprint: str) -> Answer | FailOpen | Held:
        """Claim *key* for *principal*'s request with *fingerprint*: the request's answer if the key was there
        (waiting for the first request, with ``on_conflict="wait"``), a :class:`FailOpen` if the store failed and
        ``on_store_error="fail_open"``, else the claim the app is to run under."""
        policy = self.policy
        store_key = scoped_key(principal_digest(principal), key)
        cache = self.cache
        if cache is not None:
            with self._cache_lock:
                cached = cache.get(store_key, time.monotonic())
            if cached is not None:  # a completed record: the store's answer, without asking it
                answer = decide_cached(cached[0], cached[1], fingerprint)
                if type(answer) is bytes:
                    return self._replay(store_key, answer)
                return self.refuse("mismatch", MISMATCH.error())
        started = 0.0
        delay = 0.0
        while True:
            token = new_token() if self.claims_with_token else None
            try:
                if token is None:
                    claim: Claim = self.calls.claim(store_key, fingerprint, lease=policy.lease, ttl=policy.ttl)
                else:
                    claim = self.calls.claim(store_key, fingerprint, lease=policy.lease, ttl=policy.ttl, token=token)
            except Exception as exc:  # noqa: BLE001 - any failure of the store is on_store_failure's
                return self._claim_failed(exc, store_key, token)
            if isinstance(claim, Acquired):
                return Held(self, key, store_key, fingerprint, claim.token)
            record = claim.record
            now = time.time()
            decision = decide(record, fingerprint, now=now, retry_after=policy.retry_after)
            payload = record.payload
            if cache is not None and record.state is State.COMPLETED and payload and payload[:1] == b"\x01":
                with self._cache_lock:
                    cache.put(store_key, record.fingerprint, payload, time.monotonic(), record.expires_at - now)
            if isinstance(decision, Conflict):
                if not started:
                    started = time.monotonic()
                step = wait_or_answer(policy, decision, waited=time.monotonic() - started, delay=delay)
                if isinstance(step, Wait):
                    time.sleep(step.seconds)
                    delay = step.seconds
                    continue
                return self.refuse("conflict", decision.error())
            if isinstance(decision, Replay):
                return self._replay(store_key, decision.payload)
            if isinstance(decision, Mismatch):
                return self.refuse("mismatch", decision.error())
            outcome: Outcome = "replayed" if isinstance(decision, NotStored) else "outcome_unknown"
            return self.refuse(outcome, decision.error())

    def _claim_failed(self, exc: Exception, store_key: str, token: str | None) -> Answer | FailOpen:
        if token is not None:  # release it, in case the store made it after all
            _Recorder(self, store_key, "", 0).start_later(token, None, 0, time.monotonic() + self.policy.lease)
        answer = on_store_failure(self.policy)
        if isinstance(answer, FailOpen):
            logger.warning("idempo: store %r failed (%s); running the request unprotected", self.store, exc)
            return answer
        logger.error("idempo: store %r failed: %s", self.store, exc)
        status, headers, body = answer.problem(self.policy.problem_base_uri).render(retry_after=answer.retry_after)
        return Answer(status, headers, body, "store_error")


class Held:
    """A claimed key, while the app runs under it and its response goes out. One per request.

    The face calls :meth:`run` around the app (the lease is renewed meanwhile, and the app may report its outcome
    unknown), :meth:`start` with the response's status and headers, :meth:`chunk` with each chunk of its body, and
    :meth:`finish` once the body is over (or the app failed), before the last chunk leaves.
    """

    __slots__ = (
        "chunks",
        "fingerprint",
        "guard",
        "headers",
        "keep",
        "key",
        "renewed_at",
        "report",
        "size",
        "status",
        "store_key",
        "token",
        "too_large",
    )

    def __init__(self, guard: Guard, key: str, store_key: str, fingerprint: str, token: str) -> None:
        self.guard = guard
        self.key = key
        self.store_key = store_key
        self.fingerprint = fingerprint
        self.token = token
        self.renewed_at = 0.0
        self.report: OutcomeReport | None = None
        self.status = 0
        self.headers: Iterable[tuple[bytes, bytes]] = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep = False
        self.too_large = False

    def enter(self, *, head: bool = False) -> None:
        """The app is about to run: renew the lease while it does, and open its outcome report, where the app finds
        the claim to record its response in a transaction of its own (:mod:`idempo.transactions`). *head*: the
        request is a HEAD."""
        guard = self.guard
        guard.renewer.hold(self)
        self.report = report = OutcomeReport.open()
        report.bound = Bound(guard.policy, guard.store, guard.target, self.store_key, self.token, head=head)

    @property
    def in_transaction(self) -> int:
        """Whether the app recorded the response in a transaction of its own: ``OPEN`` (no), ``RECORDED`` (yes, and
        no one saw that transaction commit: it may have rolled back) or ``COMMITTED``."""
        report = self.report
        bound = None if report is None else report.bound
        return OPEN if bound is None else bound.state

    def leave(self) -> None:
        """The app returned (its response may still be streaming): its outcome report is closed. The lease is
        renewed until :meth:`finish`."""
        if self.report is not None:
            self.report.close()

    @property
    def unknown(self) -> bool:
        """Whether the app said its outcome is unknown (:func:`~idempo.mark_outcome_unknown`)."""
        return self.report is not None and self.report.unknown

    def mark_unknown(self) -> None:
        """The app raised :class:`~idempo.OutcomeUnknownError`."""
        if self.report is not None:
            self.report.mark_unknown()
        else:  # pragma: no cover - the faces enter() before the app runs
            self.report = OutcomeReport()
            self.report.unknown = True

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """The response starts with *status* and *headers* (lower or mixed case bytes). Returns ``False`` if the
        face must answer :meth:`Guard.unknown` instead: a framework turned an ``OutcomeUnknownError`` into a 500, and
        a client told 500 would think the operation failed and try again under a new key."""
        self.status = status
        self.keep = should_store(status, store_server_errors=self.guard.policy.store_server_errors)
        if self.keep:
            self.headers = headers
        elif status == 500 and self.unknown:
            self.status = OutcomeUnknownError.status
            return False
        return True

    def chunk(self, data: bytes) -> None:
        """One chunk of the body, as it goes out."""
        if self.keep and data and not self.too_large:
            self.size += len(data)
            if self.size > self.guard.policy.max_response_bytes:
                self.too_large = True
                self.chunks.clear()
            else:
                self.chunks.append(data if type(data) is bytes else bytes(data))

    def stream(
        self, chunks: Iterable[bytes], *, head: bool = False, before: Callable[[], None] | None = None
    ) -> RecordedStream:
        """The body *chunks* of a streaming response (a WSGI iterable, Django's ``streaming_content``, Flask's
        ``response.response``), recorded as they go and finished before the last one is handed on: see
        :class:`RecordedStream`. *before* is called once, before the first chunk is handed on (or at the end, for an
        empty body): a WSGI face starts its server's response there."""
        return RecordedStream(self, chunks, head, before)

    def finish(self, *, failed: bool = False, head: bool = False) -> None:
        """Complete or release the claim, once, as :func:`~idempo._core.decide.record_for` says. If the store fails,
        keep trying from a thread while the lease lasts (the response is the client's already, and must not wait)."""
        if not self.token:
            return
        token, self.token = self.token, ""
        guard = self.guard
        guard.renewer.drop(self)
        self.leave()
        in_transaction = self.in_transaction
        if in_transaction == COMMITTED:  # the app's transaction completed the key: nothing to write
            _Recorder(guard, self.store_key, self.fingerprint, self.status, in_transaction).recorded_in_transaction(
                self.report
            )
            return
        unknown = self.unknown
        if unknown:
            logger.warning("idempo: the outcome of a request is unknown; its key is kept until resolved or expired")
            if not self.status:
                self.status = OutcomeUnknownError.status
        recorded = record_for(
            guard.policy,
            self.status,
            self.headers,
            self.chunks,
            size=self.size,
            failed=failed,
            kept=self.keep,
            too_large=self.too_large,
            unknown=unknown,
            head=head,
        )
        if recorded.unsendable is not None:
            logger.error("idempo: a response cannot be sent as it is (%s); it is not stored", recorded.unsendable)
        recorder = _Recorder(guard, self.store_key, self.fingerprint, self.status, in_transaction)
        try:
            recorder.apply(token, recorded.payload, recorded.ttl, fall_back=False)
        except Exception as exc:  # noqa: BLE001 - any failure of a store is retried, never the client's problem
            logger.error("idempo: could not record the outcome of a request (%s); retrying while its lease lasts", exc)
            recorder.start_later(token, recorded.payload, recorded.ttl, self.renewed_at + guard.policy.lease)


class RecordedStream:
    """A streaming body, recorded chunk by chunk; the outcome is recorded before the last chunk is handed on (one chunk
    is held back to know which is last), so that a client that has the whole response and retries at once finds the
    final state. The app's code that produces the chunks runs with the request's outcome report current (it may say
    the outcome is unknown). Closed before its end (the server stopped reading: the client left), it reads and
    records the rest of the response for the retry; it always closes the app's iterable (PEP 3333's ``close()``)."""

    __slots__ = ("before", "chunks", "head", "held", "iterator", "last", "over", "pending")

    def __init__(self, held: Held, chunks: Iterable[bytes], head: bool, before: Callable[[], None] | None) -> None:
        self.held = held
        self.chunks = chunks
        self.head = head
        self.before = before
        self.iterator: Iterator[bytes] | None = None
        self.pending: bytes | None = None
        self.last = False  # the app's iterable is over; the pending chunk is the last one
        self.over = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while not self.last:
            chunk = self._next()
            if chunk is None:  # the end: recorded; the last chunk goes next
                self.last = True
                break
            if not chunk:
                continue
            previous, self.pending = self.pending, chunk
            if previous is not None:
                self._before()
                return previous
        if self.over:
            raise StopIteration
        self.over = True
        self._before()
        if self.pending is None:
            raise StopIteration
        return self.pending

    def _before(self) -> None:
        if self.before is not None:
            before, self.before = self.before, None
            before()

    def _next(self) -> bytes | None:
        """The app's next chunk (recorded), or ``None`` at its end (the outcome recorded)."""
        held = self.held
        report = held.report
        if report is not None:
            report.enter()
        try:
            if self.iterator is None:
                self.iterator = iter(self.chunks)
            chunk = next(self.iterator)
        except StopIteration:
            if report is not None:
                report.close()
            held.finish(head=self.head)
            return None
        except OutcomeUnknownError:
            if report is not None:
                report.close()
            held.mark_unknown()
            held.finish(failed=True)
            raise
        except BaseException:
            if report is not None:
                report.close()
            held.finish(failed=True)
            raise
        if report is not None:
            report.close()
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        held.chunk(chunk)
        return chunk

    def close(self) -> None:
        """Read and record the rest if the stream stopped early; close the app's iterable."""
        try:
            if self.held.token:  # stopped before the end (the client left): read on, and record
                while self._next() is not None:
                    pass
        finally:
            close = getattr(self.chunks, "close", None)
            if close is not None:
                close()


class _Recorder:
    """How one claimed key's outcome reaches the store: completing or releasing it, falling back to the few bytes of
    the "not stored" marker when the store is full, and trying again from a thread while the lease lasts."""

    __slots__ = ("fingerprint", "guard", "in_transaction", "status", "store_key")

    def __init__(self, guard: Guard, store_key: str, fingerprint: str, status: int, in_transaction: int = OPEN) -> None:
        self.guard = guard
        self.store_key = store_key
        self.fingerprint = fingerprint
        self.status = status
        self.in_transaction = in_transaction

    def recorded_in_transaction(self, report: OutcomeReport | None) -> None:
        """The app's transaction completed the key: remember its response, if the cache is on."""
        bound = None if report is None else report.bound
        payload = None if bound is None else bound.payload
        cache = self.guard.cache
        if cache is not None and bound is not None and payload is not None and payload[:1] == b"\x01":
            with self.guard._cache_lock:
                cache.put(self.store_key, self.fingerprint, payload, time.monotonic(), bound.ttl)

    def apply(self, token: str, payload: bytes | None, ttl: float, *, fall_back: bool) -> None:
        """Release the key (*payload* ``None``) or complete it with *payload* (or its fallback, if the store refuses
        it for want of room, or fails otherwise and *fall_back*)."""
        store = self.guard.calls
        if payload is None:
            store.release(self.store_key, token)
            return
        try:
            done = store.complete(self.store_key, token, payload, ttl=ttl)
        except Exception as exc:
            smaller = fallback(payload, self.status) if fall_back or isinstance(exc, StoreFullError) else None
            if smaller is None:
                raise
            logger.error("idempo: could not store a response (%s); storing that the request ran instead", exc)
            done = store.complete(self.store_key, token, smaller, ttl=ttl)
            payload = smaller
        cache = self.guard.cache
        if not done:
            if self.in_transaction == OPEN:
                logger.warning("idempo: a request finished after its key was taken over; its response is not stored")
            # else the app's transaction completed the key (it committed): nothing more to write
        elif cache is not None and payload[:1] == b"\x01":  # a response; markers are never cached
            with self.guard._cache_lock:
                cache.put(self.store_key, self.fingerprint, payload, time.monotonic(), ttl)

    def start_later(self, token: str, payload: bytes | None, ttl: float, deadline: float) -> None:
        """Keep trying to record an outcome until *deadline* (monotonic clock), from a daemon thread, which
        :func:`finish_recording` waits for."""
        args = (token, payload, ttl, deadline)
        thread = threading.Thread(target=self._later, args=args, name="idempo-record", daemon=True)
        with _recording_lock:
            _recording.add(thread)
        thread.start()

    def _later(self, token: str, payload: bytes | None, ttl: float, deadline: float) -> None:
        try:
            self._try_until(token, payload, ttl, deadline)
        finally:
            with _recording_lock:
                _recording.discard(threading.current_thread())

    def _try_until(self, token: str, payload: bytes | None, ttl: float, deadline: float) -> None:
        delay = RECORD_RETRY_FIRST
        failure: Exception | None = None
        while time.monotonic() + delay < deadline:
            time.sleep(delay)
            after = next_record_pause(delay)
            last = time.monotonic() + after >= deadline
            try:
                self.apply(token, payload, ttl, fall_back=last)
            except Exception as exc:  # noqa: BLE001 - as in Held.finish
                failure = exc
                delay = after
                continue
            logger.warning("idempo: the outcome of a request was recorded after the store came back")
            return
        logger.error(
            "idempo: gave up recording the outcome of a request (%s); once its lease runs out, a retry runs it again",
            failure,
        )


_TIMED: Final = frozenset({"claim", "renew", "complete", "release"})


class _ObservedSyncStore:
    """A sync store's calls timed for an observer (``claim``, ``renew``, ``complete``, ``release``)."""

    def __init__(self, store: SyncStore, observer: Observer) -> None:
        self._inner = store
        self._observer = observer

    def __repr__(self) -> str:
        return repr(self._inner)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in _TIMED:
            return method
        observer = self._observer
        operation: StoreOperation = name  # type: ignore[assignment]

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return method(*args, **kwargs)
            except BaseException as exc:
                error = exc
                raise
            finally:
                try:
                    observer.on_store_call(operation, time.perf_counter() - started, error)
                except Exception:
                    logger.exception("idempo: an observer failed")

        return timed
