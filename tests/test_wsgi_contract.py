"""The HTTP contract of SPEC section 3 on the blocking faces: ONE table of scenarios (:data:`SCENARIOS`), the rows of
the ASGI middleware's contract (``tests/test_middleware.py``) that apply to a blocking face, run against three
adapters (``tests/support/faces.py``: the WSGI middleware, the Django middleware, the Flask extension) on four stores
(memory, SQLite, Redis, PostgreSQL).

Each scenario is data: the options, the app's behaviour (one neutral description each face builds into an app of
its framework that counts its executions), the requests in order with the answer each must get, and the number of
executions. A few steps are small functions (what is looked at in the store, or in what the app saw). A scenario
that does not apply to a face or a store says why, in the table.

Every wait is on an event or a condition (the app started, the store saw n claims or renewals), never a sleep.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo._core.fingerprint import principal_digest, scoped_key
from idempo.stores import SyncStore, sync_store_from_url
from tests.support.environment import with_options
from tests.support.faces import (
    BASE_URL,
    BOUND,
    FACES,
    Behaviour,
    Executions,
    Face,
    Options,
    Seen,
    SpyStore,
    WSGIServer,
)
from tests.support.middleware import problem_of

KEY = "8e03978e-40d5-43e8-bc93-6894a57f9324"
STORES = ("memory", "sqlite", "redis", "postgres")
MEMORY = ("memory",)
"""The stores of a row of pure admission (the answer is given before the store is asked), or of a row whose store
is a user's failing one: it cannot depend on the backend, so it runs on memory only."""


def stored_key(key: str = KEY, principal: str = "") -> str:
    return scoped_key(principal_digest(principal), key)


# -- the language of the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """One request. *key*: one header's value, several (several headers), or ``None`` (no header)."""

    method: str = "POST"
    path: str = "/orders"
    body: bytes = b"{}"
    key: str | bytes | tuple[str, ...] | None = KEY
    headers: tuple[tuple[str, str], ...] = ()

    def send(self, client: httpx.Client) -> httpx.Response:
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]
        keys = self.key if isinstance(self.key, tuple) else () if self.key is None else (self.key,)
        headers += [(b"Idempotency-Key", key if isinstance(key, bytes) else key.encode("latin-1")) for key in keys]
        return client.request(self.method, self.path, content=self.body, headers=headers)


@dataclass(frozen=True)
class Expect:
    """What the answer must be. *same_as*: the body of an earlier named answer, and if *replayed*, its headers as
    a replay has them (the first's, minus hop-by-hop and Set-Cookie, plus ``Idempotent-Replayed: true``).
    *error*: ``"app"``, the app's exception (raised to the server by the WSGI face; answered 500 by Django's and
    Flask's own error handling, where the claim is released the same way), or ``"stream"``, raised mid-body (to the
    server, on every face)."""

    status: int | None = None
    problem: str | None = None
    replayed: bool | None = None
    same_as: str | None = None
    call: int | None = None
    retry_after: str | None = None
    error: str | None = None
    check: Callable[[httpx.Response, Run], None] | None = None


@dataclass
class Run:
    """One scenario running on one face and one store."""

    face: Face
    client: httpx.Client
    executions: Executions
    store: SpyStore
    seen: Seen
    pool: ThreadPoolExecutor
    options: Options
    caplog: pytest.LogCaptureFixture
    answers: dict[str, httpx.Response] = field(default_factory=dict)
    started: dict[str, Future[httpx.Response]] = field(default_factory=dict)


Step = Callable[[Run], None]


def send(request: Req = Req(), expect: Expect = Expect(), name: str | None = None) -> Step:
    """Send *request* and check its answer against *expect*."""

    def step(run: Run) -> None:
        if expect.error == "stream" or (expect.error == "app" and run.face.surfaces_exceptions):
            with pytest.raises(RuntimeError, match="boom"):
                request.send(run.client)
            return
        answer = request.send(run.client)
        check(answer, expect, run)
        if name is not None:
            run.answers[name] = answer

    return step


def start(name: str, request: Req = Req()) -> Step:
    """Send *request* from a thread of its own; :func:`join` it later."""

    def step(run: Run) -> None:
        run.started[name] = run.pool.submit(request.send, run.client)

    return step


def join(name: str, expect: Expect = Expect()) -> Step:
    """The answer of a request :func:`start` sent, checked."""

    def step(run: Run) -> None:
        answer = run.started.pop(name).result(timeout=BOUND)
        check(answer, expect, run)
        run.answers[name] = answer

    return step


def executions(count: int) -> Step:
    """Wait until the app has started *count* executions."""
    return lambda run: run.executions.wait_for_calls(count)


def claims(count: int) -> Step:
    """Wait until the store has answered *count* claims (a request that found the key taken is now waiting)."""
    return lambda run: run.store.wait_for("claims", count)


def open_gate(run: Run) -> None:
    """Let the gated executions answer."""
    run.executions.gate.set()


def released(run: Run) -> None:
    """Nothing is kept under the key (the claim was released)."""
    assert run.store.inner.get(stored_key()) is None


def keys_seen(*keys: str | None) -> Step:
    def step(run: Run) -> None:
        assert run.executions.keys == list(keys)

    return step


def bodies_seen(*bodies: bytes) -> Step:
    def step(run: Run) -> None:
        assert run.executions.bodies == list(bodies)

    return step


def closed(count: int) -> Step:
    """The app's iterable was closed *count* times (once per execution)."""

    def step(run: Run) -> None:
        assert run.executions.closed == count

    return step


def replayed(answer: httpx.Response) -> bool:
    return bool(answer.headers.get("idempotent-replayed") == "true")


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
    | {"upgrade"}
)


def replay_headers(first: httpx.Response, *, set_cookie: bool = False) -> list[tuple[bytes, bytes]]:
    """The headers a replay of *first* has, but ``Idempotent-Replayed`` (names lower case, order kept)."""
    raw = [(name.lower(), value) for name, value in first.headers.raw]
    dropped = set(_HOP_BY_HOP)
    for name, value in raw:
        if name == b"connection":
            dropped |= {token.strip().lower() for token in value.decode("latin-1").split(",")}
    if not set_cookie:
        dropped.add("set-cookie")
    return [(name, value) for name, value in raw if name.decode("latin-1") not in dropped]


def check(answer: httpx.Response, expect: Expect, run: Run) -> None:
    if expect.problem is not None:
        assert expect.status is not None
        problem_of(answer, expect.status, expect.problem)
    elif expect.error == "app":  # Django's or Flask's 500 in place of the app's exception
        assert answer.status_code == 500, answer.text
    elif expect.status is not None:
        assert answer.status_code == expect.status, answer.text
    if expect.replayed is not None:
        assert replayed(answer) is expect.replayed, answer.headers
    if expect.same_as is not None:
        first = run.answers[expect.same_as]
        assert answer.status_code == first.status_code
        assert answer.content == first.content
        if expect.replayed:
            raw = [(name.lower(), value) for name, value in answer.headers.raw]
            assert raw.count((b"idempotent-replayed", b"true")) == 1, raw
            raw.remove((b"idempotent-replayed", b"true"))
            allowed = bool(run.options.policy.get("replay_set_cookie"))
            assert raw == replay_headers(first, set_cookie=allowed)
    if expect.call is not None:
        assert answer.json()["call"] == expect.call
    if expect.retry_after is not None:
        assert answer.headers["retry-after"] == expect.retry_after
    if expect.check is not None:
        expect.check(answer, run)


OK = Expect(status=200, replayed=False)
FIRST = Expect(status=200, replayed=False, call=1)
REPLAY = Expect(replayed=True, same_as="first")
CONFLICT = Expect(status=409, problem="in-progress")
REUSED = Expect(status=422, problem="key-reused")
INVALID = Expect(status=400, problem="invalid-key")
MISSING = Expect(status=400, problem="missing-key")


@dataclass(frozen=True)
class Scenario:
    """One row: what it ports (*asgi*: the ASGI contract's test), its options, the app, the steps, the executions.

    *stores*: where it runs (``MEMORY`` for admission, said in *why_memory*). *not_on*: the faces it cannot apply
    to, each with the reason. *store*: the user-written store around the real one (``SpyStore`` options).
    *server*: the options of the in-process server (``chunked``, ``leave_after``).
    """

    id: str
    asgi: str
    steps: Sequence[Step]
    calls: int
    app: Behaviour = field(default_factory=Behaviour)
    options: Options = field(default_factory=Options)
    stores: Sequence[str] = STORES
    why_memory: str = ""
    not_on: dict[str, str] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)


def policy(**options: Any) -> Options:
    return Options(policy=options)


WSGI_ONLY = {
    "django": "WSGI's own plumbing (the server's environ, write(), the iterable's close()): Django hides it",
    "flask": "WSGI's own plumbing (the server's environ, write(), the iterable's close()): Flask hides it",
}
ADMISSION = "pure admission: answered before the store is asked"
USER_STORE = "the store is a user's failing one around memory: the row is about the face, not the backend"
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ",")
REUSE = [
    Req(body=b'{"amount": 11}'),
    Req(body=b""),
    Req(path="/refunds", body=b'{"amount": 10}'),
    Req(method="PUT", body=b'{"amount": 10}'),
    Req(path="/orders?currency=eur", body=b'{"amount": 10}'),
    Req(path="/orders?", body=b'{"amount": 10}x'),
]
RELEASED_STATUSES = (500, 502, 503, 504, 408, 409, 425, 429)
STORED_STATUSES = (200, 201, 202, 204, 301, 302, 303, 400, 401, 403, 404, 410, 422)
HOP_BY_HOP = (
    ("Content-Type", "text/plain"),
    ("Connection", "keep-alive, X-Conn-Scoped"),
    ("Keep-Alive", "timeout=5"),
    ("X-Conn-Scoped", "dropped as the Connection header names it"),
    ("Proxy-Authenticate", "Basic"),
    ("Trailer", "x-checksum"),
    ("Upgrade", "h2c"),
    ("TE", "trailers"),
    ("Set-Cookie", "session=abc; HttpOnly"),
    ("Set-Cookie", "other=def"),
    ("X-Kept", "yes"),
)
REPEATED = (("Accept", "application/json"), ("Accept", "text/plain"), ("X-Trace", "a"), ("X-Trace", "b"))
ALICE = (("Authorization", "Bearer alice-token"),)
BOB = (("Authorization", "Bearer bob-token"),)
BIG = bytes(range(256)) * 8  # 2048 bytes


def _no_alice(answer: httpx.Response, run: Run) -> None:
    for secret in ("alice", principal_digest("Bearer alice-token"), "call"):
        assert secret not in answer.text
    assert set(answer.json()) == {"type", "title", "status", "detail"}


def _first_unchanged(answer: httpx.Response, run: Run) -> None:
    _has(answer, "x-request-id", "r-1")
    _has(answer, "set-cookie", "s=1; Path=/")
    assert answer.json() == {"call": 1, "method": "POST", "path": "/orders", "body": '{"amount": 10}'}


def _no_hop_by_hop(answer: httpx.Response, run: Run) -> None:
    names = [name.lower() for name, _ in answer.headers.raw]
    assert b"x-kept" in names
    for name in (b"connection", b"keep-alive", b"x-conn-scoped", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert name not in names
    assert b"te" not in names
    assert b"set-cookie" not in names
    if run.face.name == "wsgi":  # the app's own headers, nothing added
        assert names == [b"content-type", b"x-kept", b"idempotent-replayed"]


def _not_stored(original: int, reason: str | None = None) -> Callable[[httpx.Response, Run], None]:
    def check_it(answer: httpx.Response, run: Run) -> None:
        document = answer.json()
        assert document["original_status"] == original
        if reason is not None:
            assert document["reason"] == reason

    return check_it


def _renewed_past_the_lease(lease: float) -> Step:
    """Wait (on renew calls, not on the clock) until the first lease would have run out without them."""

    def step(run: Run) -> None:
        record = run.store.inner.get(stored_key())
        assert record is not None
        renewals = 2
        deadline = time.monotonic() + BOUND  # a bound on a failure (no renewals at all), not a synchronisation
        while True:
            run.store.wait_for("renewals", renewals)
            if time.time() > record.created_at + lease + 0.05:
                break
            renewals += 1
            assert time.monotonic() < deadline

    return step


def _one_owner(run: Run) -> None:
    assert len(run.store.tokens) == 1  # nobody took the key over
    assert run.store.renewals >= 2


def _logged(text: str, level: int) -> Step:
    def step(run: Run) -> None:
        records = run.caplog.records
        assert any(r.levelno == level and text in r.getMessage() for r in records), [r.getMessage() for r in records]

    return step


def _store_calls(*calls: str) -> Step:
    def step(run: Run) -> None:
        assert [c for c in run.store.calls if c != "get"] == list(calls)

    return step


def _principals_seen(*values: str) -> Step:
    def step(run: Run) -> None:
        assert run.seen.principals == list(values)

    return step


def _fingerprints_seen(*values: tuple[str, bytes]) -> Step:
    def step(run: Run) -> None:
        assert run.seen.fingerprints == list(values)

    return step


def _stored_under(*keys: str) -> Step:
    def step(run: Run) -> None:
        for key in keys:
            assert run.store.inner.get(key) is not None, key

    return step


def _retry_on_a_patient_server(body: bytes) -> Step:
    def step(run: Run) -> None:
        app = run.client._transport.app  # type: ignore[attr-defined]
        with httpx.Client(transport=WSGIServer(app), base_url=BASE_URL) as patient:
            retry = Req().send(patient)
        assert replayed(retry)
        assert retry.status_code == 201
        assert retry.content == body

    return step


def _equal(actual: object, expected: object) -> None:
    assert actual == expected


def _absent(needle: bytes, haystack: bytes) -> None:
    assert needle not in haystack


def _has(answer: httpx.Response, name: str, value: str) -> None:
    # .strip(): Django's WSGIHandler writes its cookies with a leading space (Morsel.output(header="")).
    assert (answer.headers.get(name) or "").strip() == value, answer.headers


def _has_header(answer: httpx.Response, name: str) -> None:
    assert name in answer.headers


# -- the table -------------------------------------------------------------------------------------------------------

SCENARIOS: list[Scenario] = [
    # -- malformed and missing keys (admission: memory only) --
    *(
        Scenario(
            f"malformed-key-{name}",
            "test_malformed_key_is_400_and_the_app_is_not_called",
            [send(Req(key=raw), INVALID)],
            calls=0,
            stores=MEMORY,
            why_memory=ADMISSION,
        )
        for name, raw in [
            ("empty", b""),
            ("256-chars", b"a" * 256),
            ("space", b"has space"),
            ("non-ascii-latin1", b"caf\xe9"),
            ("unterminated-quote", b'"abc'),
            ("empty-quoted", b'""'),
        ]
    ),
    Scenario(
        "key-of-255-visible-characters",
        "test_key_of_255_visible_ascii_characters_is_accepted (but the comma: a blocking face refuses a key with a "
        "comma, as the server joins repeated headers with commas)",
        [send(Req(key=(VISIBLE * 3)[:255]), OK), send(Req(key=(VISIBLE * 3)[:255]), Expect(replayed=True))],
        calls=1,
        stores=MEMORY,
        why_memory=ADMISSION,
    ),
    Scenario(
        "sf-string-key-is-the-bare-key",
        "test_sf_string_key_is_the_same_record_as_the_bare_key",
        [
            send(Req(key='"abc"'), OK, name="first"),
            send(Req(key="abc"), REPLAY),
            send(Req(key=r'"a\"b\\c"'), OK, name="escaped"),
            send(Req(key=r'a"b\c'), Expect(replayed=True, same_as="escaped")),
            keys_seen("abc", r'a"b\c'),
        ],
        calls=2,
    ),
    *(
        Scenario(
            f"two-key-headers-{values[0]}-{values[1]}",
            "test_two_key_headers_are_400 (the server joins them with a comma)",
            [send(Req(key=values), INVALID)],
            calls=0,
            stores=MEMORY,
            why_memory=ADMISSION,
        )
        for values in [("one", "two"), ("same", "same")]
    ),
    Scenario(
        "other-repeated-headers",
        "test_other_repeated_headers_leave_one_key_valid",
        [send(Req(headers=REPEATED), OK, name="first"), send(Req(headers=REPEATED), REPLAY)],
        calls=1,
        stores=MEMORY,
        why_memory=ADMISSION,
    ),
    Scenario(
        "require-key",
        "test_require_key_true_answers_400_to_unkeyed_mutations_only",
        [
            *(send(Req(method=method, key=None), MISSING) for method in ("POST", "PUT", "PATCH", "DELETE")),
            send(Req(method="GET", key=None, body=b""), Expect(status=200)),
            send(Req(), OK),
        ],
        calls=2,
        options=policy(require_key=True),
        stores=MEMORY,
        why_memory=ADMISSION,
    ),
    Scenario(
        "require-key-predicate",
        "test_require_key_predicate_applies_to_its_paths_only",
        [
            send(Req(path="/payments/charge", key=None), MISSING),
            send(Req(path="/profile", key=None), OK),
            send(Req(path="/profile", key=None), OK),
            send(Req(path="/payments/charge"), OK),
        ],
        calls=3,
        options=policy(require_key=lambda path: path.startswith("/payments")),
        stores=MEMORY,
        why_memory=ADMISSION,
    ),
    # -- first request, replay --
    Scenario(
        "first-request-unchanged",
        "test_first_request_runs_and_its_response_is_unchanged",
        [
            send(
                Req(body=b'{"amount": 10}'),
                Expect(
                    status=201,
                    replayed=False,
                    check=_first_unchanged,
                ),
            ),
            bodies_seen(b'{"amount": 10}'),
        ],
        calls=1,
        app=Behaviour(
            status=201,
            headers=(("Content-Type", "application/json"), ("X-Request-Id", "r-1"), ("Set-Cookie", "s=1; Path=/")),
        ),
    ),
    Scenario(
        "every-protected-method-replayed",
        "test_every_protected_method_is_replayed",
        [
            step
            for method in ("POST", "PUT", "PATCH", "DELETE")
            for step in (
                send(Req(method=method, path="/orders/1", key=f"k-{method}"), OK, name=method),
                send(Req(method=method, path="/orders/1", key=f"k-{method}"), Expect(replayed=True, same_as=method)),
            )
        ],
        calls=4,
    ),
    Scenario(
        "replay-byte-exact",
        "test_replay_has_same_status_headers_and_body_and_does_not_run_the_app",
        [
            send(Req(body=b'{"amount": 10}'), Expect(status=201, replayed=False), name="first"),
            *(
                send(
                    Req(body=b'{"amount": 10}'),
                    Expect(
                        replayed=True,
                        same_as="first",
                        check=lambda answer, run: _equal(
                            (answer.headers["location"], answer.headers.get_list("x-custom", split_commas=True)),
                            ("/orders/42", ["first", "second"]),
                        ),
                    ),
                )
                for _ in range(3)
            ),
        ],
        calls=1,
        app=Behaviour(
            status=201,
            headers=(
                ("Content-Type", "application/json; charset=utf-8"),
                ("Location", "/orders/42"),
                ("X-Custom", "first"),
                ("X-Custom", "second"),
                ("Cache-Control", "no-store"),
            ),
        ),
    ),
    Scenario(
        "hop-by-hop-and-set-cookie-not-replayed",
        "test_hop_by_hop_headers_and_set_cookie_are_not_replayed",
        [
            send(Req(), Expect(status=200, replayed=False), name="first"),
            send(Req(), Expect(replayed=True, same_as="first", check=_no_hop_by_hop)),
        ],
        calls=1,
        app=Behaviour(headers=HOP_BY_HOP, chunks=[b"done"]),
    ),
    Scenario(
        "set-cookie-replayed-when-allowed",
        "test_set_cookie_is_replayed_when_allowed",
        [
            send(Req(), Expect(status=200, replayed=False), name="first"),
            send(
                Req(),
                Expect(
                    replayed=True,
                    same_as="first",
                    check=lambda a, r: _equal(
                        [v.strip() for v in a.headers.get_list("set-cookie")], ["session=abc; HttpOnly"]
                    ),
                ),
            ),
        ],
        calls=1,
        app=Behaviour(
            headers=(("Content-Type", "text/plain"), ("Set-Cookie", "session=abc; HttpOnly"), ("Connection", "close")),
            chunks=[b"done"],
        ),
        options=policy(replay_set_cookie=True),
    ),
    # -- key reuse --
    Scenario(
        "key-reused-422",
        "test_key_reused_with_another_request_is_422_and_nothing_runs",
        [
            send(Req(body=b'{"amount": 10}'), FIRST, name="first"),
            *(
                send(reuse, Expect(status=422, problem="key-reused", check=lambda a, r: _absent(b"amount", a.content)))
                for reuse in REUSE
            ),
            send(Req(body=b'{"amount": 10}'), REPLAY),
        ],
        calls=1,
    ),
    Scenario(
        "key-reused-while-in-progress-422",
        "test_key_reused_while_in_progress_with_another_request_is_422",
        [start("first", Req(body=b"a")), executions(1), send(Req(body=b"b"), REUSED), open_gate, join("first", OK)],
        calls=1,
        app=Behaviour(gated=True),
    ),
    # -- in progress --
    Scenario(
        "409-while-running",
        "test_same_key_while_the_first_runs_is_409_with_retry_after",
        [
            start("first"),
            executions(1),
            *(send(Req(), Expect(status=409, problem="in-progress", retry_after="5")) for _ in range(3)),
            open_gate,
            join("first", OK),
            send(Req(), REPLAY),
        ],
        calls=1,
        app=Behaviour(gated=True),
        options=policy(retry_after=5),
    ),
    Scenario(
        "409-retry-after-at-most-the-lease-left",
        "test_retry_after_of_409_is_at_most_the_lease_left",
        [
            start("first"),
            executions(1),
            send(Req(), Expect(status=409, problem="in-progress", retry_after="2")),
            open_gate,
            join("first", OK),
        ],
        calls=1,
        app=Behaviour(gated=True),
        options=policy(retry_after=60, lease=2),
    ),
    Scenario(
        "wait-replays-the-first",
        "test_wait_on_conflict_replays_the_first_response",
        [
            start("first"),
            executions(1),
            start("second"),
            claims(2),  # the second found the key in progress and is now waiting
            open_gate,
            join("first", Expect(status=201, replayed=False)),
            join("second", REPLAY),
        ],
        calls=1,
        app=Behaviour(gated=True, status=201),
        options=policy(on_conflict="wait", wait_timeout=10),
    ),
    Scenario(
        "wait-gives-up-with-409",
        "test_wait_on_conflict_gives_up_with_409_after_wait_timeout",
        [
            start("first"),
            executions(1),
            send(Req(), Expect(status=409, problem="in-progress", check=lambda a, r: _has_header(a, "retry-after"))),
            open_gate,
            join("first", OK),
        ],
        calls=1,
        app=Behaviour(gated=True),
        options=policy(on_conflict="wait", wait_timeout=0.05),
    ),
    Scenario(
        "wait-runs-if-the-first-failed",
        "test_wait_on_conflict_runs_the_request_if_the_first_failed",
        [
            start("first"),
            executions(1),
            start("second"),
            claims(2),
            open_gate,
            join("first", Expect(status=503, replayed=False, call=1)),
            join("second", Expect(status=503, replayed=False, call=2)),
        ],
        calls=2,
        app=Behaviour(gated=True, status=503),
        options=policy(on_conflict="wait", wait_timeout=10),
    ),
    # -- which outcomes are stored --
    Scenario(
        "statuses-that-did-not-happen-are-released",
        "test_statuses_that_did_not_happen_are_released_and_run_again",
        [
            step
            for number, status in enumerate(RELEASED_STATUSES)
            for step in (
                send(Req(path=f"/status/{status}", key=f"k-{status}"), Expect(status=status, call=2 * number + 1)),
                send(Req(path=f"/status/{status}", key=f"k-{status}"), Expect(status=status, replayed=False)),
            )
        ],
        calls=2 * len(RELEASED_STATUSES),
    ),
    Scenario(
        "exception-released",
        "test_app_that_raises_stores_nothing_and_the_retry_runs_again",
        [send(Req(), Expect(error="app")), released, send(Req(), Expect(status=200, replayed=False, call=2))],
        calls=2,
        app=Behaviour(raises="boom: card network down", raise_on=frozenset({1})),
    ),
    Scenario(
        "exception-after-the-response-started-released",
        "test_app_that_raises_after_starting_its_response_is_released",
        [send(Req(), Expect(error="stream")), released, send(Req(), Expect(error="stream")), released],
        calls=2,
        app=Behaviour(raises="boom: died mid-response", style="stream-then-raise", chunks=[b"partial", b"rest"]),
    ),
    Scenario(
        "store-server-errors-keeps-5xx",
        "test_store_server_errors_keeps_and_replays_5xx",
        [send(Req(), Expect(status=500, replayed=False), name="first"), send(Req(), REPLAY)],
        calls=1,
        app=Behaviour(status=500),
        options=policy(store_server_errors=True),
    ),
    Scenario(
        "store-server-errors-still-releases-an-exception",
        "test_store_server_errors_still_releases_an_exception",
        [send(Req(), Expect(error="app")), released, send(Req(), Expect(status=200, replayed=False, call=2))],
        calls=2,
        app=Behaviour(raises="boom", raise_on=frozenset({1})),
        options=policy(store_server_errors=True),
    ),
    Scenario(
        "other-statuses-stored",
        "test_other_statuses_are_stored_and_replayed",
        [
            step
            for status in STORED_STATUSES
            for step in (
                send(Req(path=f"/status/{status}", key=f"k-{status}"), Expect(status=status), name=str(status)),
                send(
                    Req(path=f"/status/{status}", key=f"k-{status}"),
                    Expect(
                        replayed=True,
                        same_as=str(status),
                        check=lambda a, r: _equal(a.headers["location"], "/orders/7"),
                    ),
                ),
            )
        ],
        calls=len(STORED_STATUSES),
        app=Behaviour(headers=(("Content-Type", "application/json"), ("Location", "/orders/7"))),
    ),
    Scenario(
        "outcome-unknown-raised-503",
        "test_middleware_unknown: raise OutcomeUnknownError -> 503 outcome-unknown, and every retry 503",
        [
            send(Req(), Expect(status=503, problem="outcome-unknown")),
            *(send(Req(), Expect(status=503, problem="outcome-unknown")) for _ in range(2)),
        ],
        calls=1,
        app=Behaviour(unknown="raise"),
        options=policy(unknown_outcome_ttl=120),
    ),
    Scenario(
        "outcome-unknown-marked",
        "test_middleware_unknown: mark_outcome_unknown() -> the app's answer, then every retry 503",
        [
            send(Req(path="/status/504"), Expect(status=504)),
            *(send(Req(path="/status/504"), Expect(status=503, problem="outcome-unknown")) for _ in range(2)),
        ],
        calls=1,
        app=Behaviour(unknown="mark"),
        options=policy(unknown_outcome_ttl=120),
    ),
    # -- the store fails (a user's failing SyncStore: memory only) --
    Scenario(
        "unreachable-store-503",
        "test_unreachable_store_is_503_with_retry_after_and_the_app_is_not_called",
        [
            *(
                send(
                    Req(),
                    Expect(
                        status=503,
                        problem="store-unavailable",
                        retry_after="7",
                        check=lambda a, r: _absent(b"refused", a.content),
                    ),
                )
                for _ in range(2)
            ),
            _store_calls("claim", "claim"),
            _logged("backend unreachable", logging.ERROR),
        ],
        calls=0,
        options=policy(retry_after=7, startup_check="off"),
        store={"fail_on": "all"},
        stores=MEMORY,
        why_memory=USER_STORE,
    ),
    Scenario(
        "fail-open",
        "test_fail_open_runs_the_app_unprotected_and_logs_a_warning",
        [
            send(Req(), Expect(status=201, replayed=False)),
            send(Req(), Expect(status=201, replayed=False)),
            keys_seen(KEY, KEY),
            _logged("unprotected", logging.WARNING),
        ],
        calls=2,
        app=Behaviour(status=201),
        options=policy(on_store_error="fail_open", startup_check="off"),
        store={"fail_on": "all"},
        stores=MEMORY,
        why_memory=USER_STORE,
    ),
    Scenario(
        "store-failing-to-record-still-answers",
        "test_store_failing_to_record_the_outcome_still_answers_the_client",
        [
            send(Req(), Expect(status=201, call=1)),
            _store_calls("claim", "complete"),
            _logged("could not record", logging.ERROR),
        ],
        calls=1,
        app=Behaviour(status=201),
        store={"fail_on": "complete"},
        stores=MEMORY,
        why_memory=USER_STORE,
    ),
    Scenario(
        "full-store-keeps-not-stored",
        "test_a_response_the_full_store_refuses_is_kept_as_not_stored_and_never_runs_again",
        [
            send(Req(), Expect(status=201)),
            *(
                send(Req(), Expect(status=410, problem="response-not-stored", check=_not_stored(201, "store_refused")))
                for _ in range(3)
            ),
        ],
        calls=1,
        app=Behaviour(status=201),
        store={"full_above": 16},
    ),
    # -- size limits --
    Scenario(
        "response-over-max-response-bytes-410",
        "test_response_over_max_response_bytes_reaches_the_client_and_a_retry_gets_410",
        [
            send(Req(path="/exports"), Expect(status=201, check=lambda a, r: _equal(a.content, BIG))),
            *(
                send(Req(path="/exports"), Expect(status=410, problem="response-not-stored", check=_not_stored(201)))
                for _ in range(2)
            ),
        ],
        calls=1,
        app=Behaviour(status=201, chunks=[BIG[:1000], BIG[1000:]], style="stream"),
        options=policy(max_response_bytes=1024),
    ),
    Scenario(
        "response-of-exactly-max-response-bytes-replayed",
        "test_response_of_exactly_max_response_bytes_is_replayed",
        [
            send(Req(path="/exports"), Expect(status=200), name="first"),
            send(Req(path="/exports"), Expect(replayed=True, check=lambda a, r: _equal(a.content, b"x" * 1024))),
        ],
        calls=1,
        app=Behaviour(chunks=[b"x" * 10, b"x" * 1014], style="stream"),
        options=policy(max_response_bytes=1024),
    ),
    Scenario(
        "request-over-max-request-bytes-413",
        "test_request_body_over_max_request_bytes_is_413_with_content_length",
        [
            send(
                Req(body=b"x" * 101),
                Expect(
                    status=413,
                    problem="body-too-large",
                    check=lambda a, r: _equal(
                        a.json()["detail"], "the request body is 101 bytes; at most 100 are accepted"
                    ),
                ),
            ),
            send(Req(body=b"x" * 100, key="other"), OK),
            send(Req(body=b"x" * 101, key=None), OK),  # without a key nothing is buffered, so no limit applies
            _stored_under(stored_key("other")),
        ],
        calls=2,
        options=policy(max_request_bytes=100),
    ),
    # -- principals, fingerprints --
    Scenario(
        "principals-isolated",
        "test_principals_never_see_each_others_responses",
        [
            send(Req(body=b"alice-secret", headers=ALICE), OK, name="a1"),
            send(Req(body=b"bob-order", headers=BOB), OK, name="b1"),
            send(Req(body=b"anon"), OK),
            send(Req(body=b"alice-secret", headers=ALICE), Expect(replayed=True, same_as="a1")),
            send(Req(body=b"bob-order", headers=BOB), Expect(replayed=True, same_as="b1")),
            send(Req(body=b"alice-secret!", headers=BOB), Expect(status=422, problem="key-reused", check=_no_alice)),
            bodies_seen(b"alice-secret", b"bob-order", b"anon"),
        ],
        calls=3,
    ),
    Scenario(
        "another-principal-not-told-the-key-is-in-use",
        "test_another_principal_is_not_told_that_a_key_is_in_use",
        [
            start("alice", Req(body=b"a", headers=(("Authorization", "alice"),))),
            executions(1),
            start("bob", Req(body=b"b", headers=(("Authorization", "bob"),))),
            executions(2),  # bob's request runs while alice's is in progress: no 409, no 422
            open_gate,
            join("alice", Expect(status=200, check=lambda a, r: _equal(a.json()["body"], "a"))),
            join("bob", Expect(status=200, check=lambda a, r: _equal(a.json()["body"], "b"))),
        ],
        calls=2,
        app=Behaviour(gated=True),
    ),
    Scenario(
        "custom-principal",
        "test_custom_principal_callable_namespaces_records",
        [
            send(Req(headers=(("X-Tenant", "t1"), ("Authorization", "a"))), OK, name="first"),
            send(Req(headers=(("X-Tenant", "t2"), ("Authorization", "a"))), OK),
            send(Req(headers=(("X-Tenant", "t1"), ("Authorization", "b"))), REPLAY),
            _principals_seen("t1", "t2", "t1"),
            _stored_under(stored_key(principal="t1"), stored_key(principal="t2")),
        ],
        calls=2,
        options=Options(principal_header="X-Tenant"),
    ),
    Scenario(
        "canonical-json",
        "test_canonical_json_makes_reordered_keys_the_same_request",
        [
            send(Req(body=b'{"amount": 10, "currency": "eur", "meta": {"a": 1, "b": [1, 2]}}'), OK, name="first"),
            send(Req(body=b'{"meta":{"b":[1,2],"a":1},\n "currency":"eur","amount":10}'), REPLAY),
            send(Req(body=b'{"amount": 11, "currency": "eur"}'), REUSED),
            bodies_seen(b'{"amount": 10, "currency": "eur", "meta": {"a": 1, "b": [1, 2]}}'),
        ],
        calls=1,
        options=policy(canonical_json=True),
    ),
    Scenario(
        "custom-fingerprint",
        "test_custom_fingerprint_callable_is_used",
        [
            send(Req(body=b"one"), OK, name="first"),
            send(Req(body=b"two"), REPLAY),
            send(Req(path="/refunds", body=b"one"), REUSED),
            _fingerprints_seen(("/orders", b"one"), ("/orders", b"two"), ("/refunds", b"one")),
        ],
        calls=1,
        options=Options(fingerprint_by_path=True),
    ),
    # -- passthrough --
    Scenario(
        "passthrough-untouched",
        "test_passthrough_requests_reach_the_app_untouched (the store fails on any use)",
        [
            *(
                send(Req(method=method, key=key, body=b""), Expect(status=200, replayed=False))
                for method, key in [
                    ("GET", "k"),
                    ("HEAD", "k"),
                    ("OPTIONS", "k"),
                    ("GET", "not a valid key"),
                    ("POST", None),
                    ("DELETE", None),
                ]
            ),
            keys_seen(None, None, None, None, None, None),
            _store_calls(),
        ],
        calls=6,
        options=policy(startup_check="off"),
        store={"fail_on": "all"},
        stores=MEMORY,
        why_memory=USER_STORE,
    ),
    Scenario(
        "methods-and-header-options",
        "test_methods_option_selects_the_protected_methods",
        [
            send(Req(key=None, headers=(("X-Request-Key", "k"),)), OK, name="first"),
            send(Req(key=None, headers=(("X-Request-Key", "k"),)), REPLAY),
            send(Req(method="PUT", key=None, headers=(("X-Request-Key", "k"),)), OK),
            send(Req(method="PUT", key=None, headers=(("X-Request-Key", "k"),)), OK),
            send(Req(), OK),
        ],
        calls=4,
        options=policy(methods=["post"], header="X-Request-Key"),
        stores=MEMORY,
        why_memory=ADMISSION,
    ),
    Scenario(
        "key-visible-to-the-app",
        "test_key_is_in_scope_state_and_existing_state_is_kept (environ['idempo.key'], request.idempotency_key, "
        "flask.g.idempotency_key)",
        [send(Req(key='"quoted-key"'), OK), send(Req(key="bare"), OK), keys_seen("quoted-key", "bare")],
        calls=2,
    ),
    Scenario(
        "problem-base-uri",
        "test_problem_base_uri_is_configurable",
        [
            send(
                Req(key=""),
                Expect(
                    status=400,
                    check=lambda a, r: _equal(
                        (a.headers["content-type"], a.json()["type"]),
                        ("application/problem+json", "https://errors.test/invalid-key"),
                    ),
                ),
            )
        ],
        calls=0,
        options=policy(problem_base_uri="https://errors.test/"),
        stores=MEMORY,
        why_memory=ADMISSION,
    ),
    # -- lease renewal --
    Scenario(
        "lease-renewed-409-not-takeover",
        "test_lease_is_renewed_while_the_app_runs_so_a_retry_is_409_not_a_takeover",
        [
            start("first"),
            executions(1),
            _renewed_past_the_lease(0.3),
            send(Req(), CONFLICT),
            open_gate,
            join("first", OK),
            _one_owner,
        ],
        calls=1,
        app=Behaviour(gated=True),
        options=policy(lease=0.3),
    ),
    # -- WSGI's own edges (the WSGI face only) --
    Scenario(
        "chunked-body-read-to-its-end",
        "test_middleware_asgi (a body in several messages): wsgi.input without Content-Length, input_terminated",
        [send(Req(body=b"x" * 100), OK, name="first"), send(Req(body=b"x" * 100), REPLAY), bodies_seen(b"x" * 100)],
        calls=1,
        options=policy(max_request_bytes=100),
        server={"chunked": True},
        not_on=WSGI_ONLY,
    ),
    Scenario(
        "chunked-body-bounded-413",
        "test_request_body_over_max_request_bytes (streamed without Content-Length)",
        [
            send(
                Req(body=b"x" * 101),
                Expect(
                    status=413,
                    problem="body-too-large",
                    check=lambda a, r: _absent(b"101 bytes", a.content),  # not known from a header
                ),
            ),
            send(Req(body=b"x" * 101, key=None), OK),  # without a key, not buffered: the app reads it
        ],
        calls=1,
        options=policy(max_request_bytes=100),
        server={"chunked": True},
        not_on=WSGI_ONLY,
    ),
    Scenario(
        "write-style-response",
        "the WSGI write() callable: sent at once, recorded, replayed",
        [
            send(Req(), Expect(status=201, check=lambda a, r: _equal(a.content, b"one-two-three"))),
            send(Req(), Expect(replayed=True, check=lambda a, r: _equal(a.content, b"one-two-three"))),
            closed(1),
        ],
        calls=1,
        app=Behaviour(status=201, chunks=[b"one-", b"two-", b"three"], style="write"),
        not_on=WSGI_ONLY,
    ),
    Scenario(
        "streamed-response-replayed-and-closed",
        "test_middleware_asgi (a body in several chunks): recorded as it goes, replayed whole; close() called",
        [
            send(Req(), Expect(status=200, check=lambda a, r: _equal(a.content, b"abc")), name="first"),
            send(Req(), REPLAY),
            closed(1),
        ],
        calls=1,
        app=Behaviour(chunks=[b"a", b"b", b"c"], style="stream"),
        not_on=WSGI_ONLY,
    ),
    Scenario(
        "close-called-after-exception",
        "test_app_that_raises_after_starting_its_response_is_released: the iterable is closed",
        [send(Req(), Expect(error="stream")), released, closed(1)],
        calls=1,
        app=Behaviour(raises="boom", style="stream-then-raise", chunks=[b"partial", b"rest"]),
        not_on=WSGI_ONLY,
    ),
    Scenario(
        "close-called-on-outcome-unknown-problem",
        "a streamed 500 of an unknown outcome is answered 503: the app's iterable is still closed",
        [send(Req(path="/status/500"), Expect(status=503, problem="outcome-unknown")), closed(1)],
        calls=1,
        app=Behaviour(unknown="mark", style="stream", chunks=[b"internal error"]),
        not_on=WSGI_ONLY,
    ),
    Scenario(
        "client-gone-rest-recorded",
        "test_middleware_recording (the client disconnects mid-body): the rest is read and recorded, the retry "
        "replays it whole, close() called",
        [
            send(Req(), Expect(status=201, check=lambda a, r: _equal(a.content, b"first-"))),
            closed(1),
            _retry_on_a_patient_server(b"first-second-third"),
        ],
        calls=1,
        app=Behaviour(status=201, chunks=[b"first-", b"second-", b"third"], style="stream"),
        server={"leave_after": 1},
        not_on=WSGI_ONLY,
    ),
]
LEFT_OUT = {
    "test_failing_store_is_a_store": "about the ASGI suite's FailingStore itself (SpyStore is a SyncStore by use)",
    "test_store_may_be_a_url_or_a_store": "each face's own tests: how it takes its store",
    "test_lifespan_and_websocket_scopes_pass_through": "ASGI scopes: WSGI has neither",
    "test_app_that_returns_without_finishing_its_response_is_released": "an ASGI app that never ends its body; a "
    "WSGI body ends when its iterable does (client-gone-rest-recorded is the blocking twin)",
    "test_invalid_options_are_rejected_at_start_up": "each face's own tests: where it raises (ConfigurationError, "
    "Django's ImproperlyConfigured)",
}
"""The tests of the ASGI contract (``tests/test_middleware.py``) with no row here, and why."""


# -- running the table -------------------------------------------------------------------------------------------------


def _params() -> Iterator[Any]:
    for scenario in SCENARIOS:
        for face in FACES:
            if face.name in scenario.not_on:
                continue
            for store in scenario.stores:
                yield pytest.param(scenario, face, store, id=f"{scenario.id}-{face.name}-{store}")


def test_every_asgi_contract_test_is_a_row_or_left_out_with_a_reason() -> None:
    """Each test of the ASGI contract is ported by a row (named in its ``asgi``), or is in :data:`LEFT_OUT`."""
    source = (Path(__file__).parent / "test_middleware.py").read_text("utf-8")
    names = re.findall(r"^(?:async )?def (test_\w+)", source, re.MULTILINE)
    assert names
    ported = " ".join(scenario.asgi for scenario in SCENARIOS)
    assert [name for name in names if name not in ported and name not in LEFT_OUT] == []
    assert all(name in names for name in LEFT_OUT)


def test_every_row_names_its_asgi_twin_and_its_exceptions() -> None:
    """The table is whole: every row says what it ports, each memory-only row says why, and each face it leaves out
    is a face, with a reason."""
    names = {face.name for face in FACES}
    assert len({s.id for s in SCENARIOS}) == len(SCENARIOS)
    for scenario in SCENARIOS:
        assert scenario.asgi
        assert (tuple(scenario.stores) == STORES) or scenario.why_memory, scenario.id
        assert set(scenario.not_on) <= names
        assert all(scenario.not_on.values())


def kind_of(store: SyncStore) -> str:
    return type(store).__name__.removeprefix("Sync").removesuffix("Store").lower()


@pytest.fixture
def store_of(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], SyncStore]]:
    """Opens a real store of a kind: one per (store, test), closed (and its PostgreSQL table dropped) at the end."""
    opened: list[SyncStore] = []

    def open_store(kind: str) -> SyncStore:
        if kind == "memory":
            store = sync_store_from_url("memory://")
        elif kind == "sqlite":
            store = sync_store_from_url(f"sqlite:///{tmp_path}/contract.db")
        elif kind == "redis":
            url = request.getfixturevalue("redis_url")
            store = sync_store_from_url(with_options(url, prefix=f"idempo-test-contract-{uuid.uuid4().hex}:"))
        else:
            url = request.getfixturevalue("postgres_url")
            store = sync_store_from_url(with_options(url, table=request.getfixturevalue("table")))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        scan = getattr(store, "scan", None)
        if kind_of(store) == "redis" and scan is not None:  # the shared server is never flushed: our keys only
            for record in list(scan()):
                store.delete(record.key)
        store.close()


@pytest.mark.parametrize(("scenario", "face", "kind"), list(_params()))
def test_contract(
    scenario: Scenario,
    face: Face,
    kind: str,
    store_of: Callable[[str], SyncStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = face.available()
    if missing is not None:
        pytest.fail(missing)  # a face of issue 15 that is not there is a failure, not a skip
    caplog.set_level(logging.WARNING, logger="idempo")
    store = SpyStore(store_of(kind), **scenario.store)
    executions = Executions()
    seen = Seen()
    with (
        face.serve(scenario.app, executions, store, scenario.options, seen) as app,
        httpx.Client(transport=WSGIServer(app, **scenario.server), base_url=BASE_URL) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        run = Run(face, client, executions, store, seen, pool, scenario.options, caplog)
        try:
            for step in scenario.steps:
                step(run)
        finally:
            executions.gate.set()  # never leave a thread waiting on a failed run
        assert not run.started, f"started and never joined: {list(run.started)}"
    assert executions.calls == scenario.calls
