"""What is particular to the WSGI face (``idempo.wsgi``) and its blocking driver (``idempo._sync``): building it (the
store it takes, the start-up check), the lease-renewing thread, the observer, ``start_response`` with ``exc_info``
and the outcome-unknown 503 in place of a streamed 500. The contract's rows, shared with Django and Flask, are
``tests/test_wsgi_contract.py``."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempo import (
    ConfigurationError,
    MemoryStore,
    OutcomeUnknownError,
    SQLiteStore,
    State,
    StoreError,
    mark_outcome_unknown,
)
from idempo._core.fingerprint import principal_digest, scoped_key
from idempo._sync import guard
from idempo._sync.leases import ThreadRenewer
from idempo.observe import Outcome, StoreOperation
from idempo.stores.memory import SyncMemoryStore
from idempo.wsgi import (
    KEY_ENVIRON,
    IdempotencyMiddleware,
    StartResponse,
    WSGIEnvironment,
    finish_recording,
    request_path,
)

KEY = "3f0f4c8e-wsgi"


def client(app: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test")


def keyed(key: str = KEY) -> dict[str, str]:
    return {"Idempotency-Key": key}


class Unreachable:
    """A user-written SyncStore whose every call fails, as a store that does not answer."""

    def _fail(self, *args: object, **kwargs: object) -> Any:
        raise ConnectionRefusedError("nothing listens there")

    claim = renew = complete = release = get = delete = purge_expired = _fail

    def close(self) -> None:
        pass


# -- building it ------------------------------------------------------------------------------------------------------


def test_an_async_store_is_used_through_its_sync_twin(tmp_path: Path) -> None:
    calls = 0

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        nonlocal calls
        calls += 1
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"made"]

    store = SQLiteStore(tmp_path / "idempo.db")
    middleware = IdempotencyMiddleware(app, store=store)
    with client(middleware) as http:
        first = http.post("/orders", headers=keyed())
        second = http.post("/orders", headers=keyed())
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.headers["idempotent-replayed"] == "true"
    assert calls == 1
    record = middleware.store.get(scoped_key(principal_digest(b""), KEY))
    assert record is not None
    assert record.state is State.COMPLETED


def test_a_store_that_is_no_store_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SyncStore or a store URL"):
        IdempotencyMiddleware(lambda e, s: [], store=object())  # type: ignore[arg-type]


def test_an_async_store_without_a_sync_twin_is_a_configuration_error() -> None:
    class AsyncOnly:
        async def claim(self, *args: object, **kwargs: object) -> None:
            raise NotImplementedError

    with pytest.raises(ConfigurationError, match=r"without \.sync\(\)"):
        IdempotencyMiddleware(lambda e, s: [], store=AsyncOnly())  # type: ignore[arg-type]


def test_a_bad_store_url_is_a_configuration_error_when_it_is_built() -> None:
    with pytest.raises(ConfigurationError):
        IdempotencyMiddleware(lambda e, s: [], store="nosuch://where")


def test_a_store_that_does_not_answer_fails_the_build(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(StoreError, match="startup_check='warn'") as raised:
        IdempotencyMiddleware(lambda e, s: [], store=Unreachable())
    assert isinstance(raised.value.__cause__, StoreError)
    assert "does not answer" in caplog.text


def test_startup_check_warn_builds_it_and_keyed_requests_get_503(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        nonlocal calls
        calls += 1
        start_response("200 OK", [])
        return [b""]

    with caplog.at_level(logging.WARNING, "idempo"):
        middleware = IdempotencyMiddleware(app, store=Unreachable(), startup_check="warn")
    assert "starting anyway" in caplog.text
    with client(middleware) as http:
        keyed_answer = http.post("/orders", headers=keyed())
        plain = http.get("/health")
    assert keyed_answer.status_code == 503
    assert keyed_answer.headers["retry-after"]
    assert plain.status_code == 200
    assert calls == 1
    with pytest.raises(StoreError):
        middleware.check_store()


def test_startup_check_off_does_not_ask_the_store() -> None:
    asked = 0

    class Counting(SyncMemoryStore):
        def get(self, key: str) -> Any:
            nonlocal asked
            asked += 1
            return super().get(key)

    IdempotencyMiddleware(lambda e, s: [], store=Counting(), startup_check="off")
    assert asked == 0
    IdempotencyMiddleware(lambda e, s: [], store=Counting())
    assert asked == 1


def test_request_path_is_script_name_and_path_info_decoded_as_utf8() -> None:
    raw = "/caf\u00e9".encode().decode("latin-1")  # PEP 3333: the bytes, as latin-1
    assert request_path({"SCRIPT_NAME": "/app", "PATH_INFO": raw}) == "/app/caf\u00e9"
    assert request_path({"PATH_INFO": "/\xff"}) == "/\udcff"  # not UTF-8: kept, as a surrogate


# -- the lease-renewing thread ----------------------------------------------------------------------------------------


class _Held:
    def __init__(self, store_key: str, token: str) -> None:
        self.store_key = store_key
        self.token = token
        self.renewed_at = 0.0
        self.in_transaction = 0  # OPEN: the app recorded nothing in a transaction of its own


def test_one_thread_renews_every_running_request_until_it_is_dropped() -> None:
    store = SyncMemoryStore()
    renewed = threading.Event()
    seen: list[str] = []

    class Watching(SyncMemoryStore):
        def renew(self, key: str, token: str, *, lease: float) -> bool:
            seen.append(key)
            if len(set(seen)) == 2:
                renewed.set()
            return store.renew(key, token, lease=lease)

    claims = [store.claim(f"k{i}", "f", lease=0.3, ttl=60) for i in range(2)]
    renewer = ThreadRenewer(Watching(), lease=0.3)
    held = [_Held(f"k{i}", claim.token) for i, claim in enumerate(claims)]  # type: ignore[union-attr]
    before = {t.ident for t in threading.enumerate()}
    for one in held:
        renewer.hold(one)
    assert renewed.wait(10)
    started = {t.name for t in threading.enumerate() if t.ident not in before}
    assert started == {"idempo-renewer"}  # one thread for both
    for one in held:
        renewer.drop(one)
    count = len(seen)
    record = store.get("k0")
    assert record is not None
    assert record.state is State.IN_PROGRESS
    assert count >= 2


def test_a_request_whose_key_was_taken_over_is_no_longer_renewed(caplog: pytest.LogCaptureFixture) -> None:
    store = SyncMemoryStore()
    lost = threading.Event()

    class Lost(SyncMemoryStore):
        def renew(self, key: str, token: str, *, lease: float) -> bool:
            lost.set()
            return False

    renewer = ThreadRenewer(Lost(), lease=0.3)
    claim = store.claim("k", "f", lease=0.3, ttl=60)
    held = _Held("k", claim.token)  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, "idempo"):
        renewer.hold(held)
        assert lost.wait(10)
        for _ in range(200):  # the warning follows the renewal's answer
            if "lost its key" in caplog.text:
                break
            threading.Event().wait(0.01)
    assert "lost its key" in caplog.text
    assert held not in renewer._running


# -- observing --------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.calls: list[tuple[StoreOperation, bool]] = []

    def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
        assert "REQUEST_METHOD" in scope  # the WSGI environ
        self.outcomes.append(outcome)

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        assert seconds >= 0
        self.calls.append((operation, error is None))


def test_the_observer_hears_each_outcome_and_each_timed_store_call() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    observer = Recorder()
    middleware = IdempotencyMiddleware(app, store=SyncMemoryStore(), observer=observer, cache_size=0)
    with client(middleware) as http:
        http.get("/")
        http.post("/orders", headers=keyed())
        http.post("/orders", headers=keyed())
        http.post("/orders", headers=keyed(), content=b"other")
        http.post("/orders", headers={"Idempotency-Key": ""})
    assert observer.outcomes == ["passthrough", "executed", "replayed", "mismatch", "bad_key"]
    assert observer.calls == [("claim", True), ("complete", True), ("claim", True), ("claim", True)]


# -- the app's response -----------------------------------------------------------------------------------------------


def test_start_response_with_exc_info_before_anything_went_out_replaces_the_response() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late")
        except ValueError:
            start_response("400 Bad Request", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"bad"]

    with client(IdempotencyMiddleware(app, store=SyncMemoryStore())) as http:
        first = http.post("/orders", headers=keyed())
        second = http.post("/orders", headers=keyed())
    assert (first.status_code, first.text) == (400, "bad")
    assert (second.status_code, second.text) == (400, "bad")
    assert second.headers["idempotent-replayed"] == "true"


def test_a_streamed_500_of_an_unknown_outcome_is_answered_503_and_the_key_is_kept() -> None:
    calls = 0

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        nonlocal calls
        calls += 1
        mark_outcome_unknown()  # a generator: runs as the server reads it
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        yield b"the framework's 500"

    store = SyncMemoryStore()
    with client(IdempotencyMiddleware(app, store=store)) as http:
        first = http.post("/pay", headers=keyed())
        second = http.post("/pay", headers=keyed())
    for answer in (first, second):
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["type"] == "urn:idempo:problem:outcome-unknown"
        assert int(answer.headers["content-length"]) == len(answer.content)
    assert calls == 1


def test_an_outcome_unknown_error_raised_by_the_app_is_503_and_never_runs_again() -> None:
    calls = 0

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        nonlocal calls
        calls += 1
        raise OutcomeUnknownError("the provider timed out")

    with client(IdempotencyMiddleware(app, store=SyncMemoryStore(), unknown_outcome_ttl=60)) as http:
        first = http.post("/pay", headers=keyed())
        second = http.post("/pay", headers=keyed())
    assert (first.status_code, second.status_code) == (503, 503)
    assert first.headers["retry-after"] == "60"
    assert calls == 1


def test_the_key_is_in_the_environ_and_none_when_there_is_none() -> None:
    seen: list[object] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(environ[KEY_ENVIRON])
        start_response("200 OK", [])
        return [b""]

    with client(IdempotencyMiddleware(app, store=SyncMemoryStore())) as http:
        http.get("/")
        http.post("/orders")
        http.post("/orders", headers=keyed('"quoted"'))
    assert seen == [None, None, "quoted"]


def test_a_memory_store_object_of_the_async_api_works_too() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("201 Created", [])
        return [b"x"]

    with client(IdempotencyMiddleware(app, store=MemoryStore())) as http:
        assert http.post("/o", headers=keyed()).status_code == 201
        assert http.post("/o", headers=keyed()).headers["idempotent-replayed"] == "true"


def test_the_renewing_thread_ends_once_idle_and_the_next_request_starts_another() -> None:
    store = SyncMemoryStore()
    renewer = ThreadRenewer(store, lease=0.2)
    claim = store.claim("k", "f", lease=0.2, ttl=60)
    held = _Held("k", claim.token)  # type: ignore[union-attr]
    renewer.hold(held)
    running = renewer._pid
    assert running != 0
    renewer.drop(held)
    ended = threading.Event()
    for _ in range(1000):  # a poll with a deadline (10 s): the thread ends a lease after the last request
        if renewer._pid == 0:
            ended.set()
            break
        ended.wait(0.01)
    assert ended.is_set()
    renewer.hold(held)
    assert renewer._pid == running  # the same process, a new thread
    renewer.drop(held)


# -- outcomes still being recorded when the process exits ------------------------------------------------------------


class CompletionDown(SyncMemoryStore):
    """A memory store whose ``complete`` fails while ``down`` is set (and says when a completion went in)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.completed = threading.Event()

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        if self.down:
            raise StoreError("the store is down")
        done = super().complete(key, token, payload, ttl=ttl)
        self.completed.set()
        return done


def test_finish_recording_waits_for_an_outcome_still_being_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The completion failed; a thread keeps trying. ``finish_recording`` (what a worker's exit hook calls) says,
    within its timeout, that the outcome is not in yet; once the store is back, it returns when it is."""
    # The process's recordings are this test's alone (other tests leave stores that stay down, retried for a lease).
    monkeypatch.setattr(guard, "_recording", set())

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"created"]

    store = CompletionDown()
    with client(IdempotencyMiddleware(app, store=store, lease=30)) as http:
        assert http.post("/orders", headers=keyed()).status_code == 201
    assert finish_recording(timeout=0.2) is False  # the store is still down
    assert not store.completed.is_set()
    store.down = False
    assert finish_recording(timeout=30) is True
    assert store.completed.is_set()
    record = store.get(scoped_key(principal_digest(b""), KEY))
    assert record is not None
    assert record.state is State.COMPLETED
    assert finish_recording() is True  # nothing left: at once
