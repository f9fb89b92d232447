"""``idempo.django.IdempotencyMiddleware`` in the Django test project (``tests/django_project``), driven by Django's
test client: its views write orders to a ledger (a SQLite file, or PostgreSQL), and "exactly once" is counted there.
The store is memory, SQLite, Redis or PostgreSQL."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from idempo import MemoryStore, RequestError, StoreError
from tests.support import django_setup
from tests.support.environment import with_options

django_setup.setup()

from django.contrib.auth.models import User  # noqa: E402 - Django is configured first
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db import connections  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from idempo.django import IdempotencyMiddleware  # noqa: E402
from tests.django_project.models import Order  # noqa: E402
from tests.django_project.views import GATES, Gate  # noqa: E402

STORES = ["memory", "sqlite", "redis", "postgres"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """idempo's store, shared by every client of the test: a MemoryStore's sync twin, or a store URL."""
    kind = request.param
    if kind == "memory":
        return MemoryStore().sync()
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/idempo.db"
    if kind == "redis":
        return with_options(request.getfixturevalue("redis_url"), prefix=f"idempo-django-{uuid.uuid4().hex}:")
    return with_options(request.getfixturevalue("postgres_url"), table=request.getfixturevalue("table"))


@pytest.fixture(scope="module")
def pg_ledger(postgres_url: str) -> Iterator[str]:
    """The ``pg`` database's ledger (a schema of the run's own, dropped at the end)."""
    django_setup.create_pg_ledger()
    yield "pg"
    django_setup.drop_pg_ledger()


@pytest.fixture(params=["default", "pg"])
def ledger(request: pytest.FixtureRequest) -> str:
    """The database the views write orders to: the SQLite file, or PostgreSQL."""
    if request.param == "pg":
        name: str = request.getfixturevalue("pg_ledger")
        return name
    return "default"


@contextmanager
def project(store: Any, ledger: str = "default", **options: Any) -> Iterator[None]:
    """The project with ``IDEMPO`` made of *store* and *options* (upper-cased), its views writing to *ledger*: each
    ``Client()`` made inside builds a middleware of its own from it."""
    settings = {"STORE": store, **{name.upper(): value for name, value in options.items()}}
    with override_settings(IDEMPO=settings, LEDGER_DATABASE=ledger):
        yield


def client() -> Client:
    return Client(raise_request_exception=False)


def post(http: Client, path: str, key: str | None, body: dict[str, Any] | None = None, **headers: str) -> Any:
    if key is not None:
        headers["Idempotency-Key"] = key
    return http.post(path, data=json.dumps(body or {}), content_type="application/json", headers=headers)


def rows(sku: str, ledger: str = "default") -> int:
    count: int = Order.objects.using(ledger).filter(sku=sku).count()
    return count


def new_sku() -> str:
    return f"sku-{uuid.uuid4().hex}"


def in_thread(call: Any) -> Any:
    """*call* run in a thread of its own, as a concurrent request is; its Django connections closed after."""

    def run() -> Any:
        try:
            return call()
        finally:
            connections.close_all()

    executor = ThreadPoolExecutor(1)
    future = executor.submit(run)
    executor.shutdown(wait=False)
    return future


# -- the contract, on every store -------------------------------------------------------------------------------------


def test_a_keyed_post_sent_twice_writes_one_row_and_is_replayed(store: Any, ledger: str) -> None:
    """The retry gets the first response byte for byte, marked replayed, without its cookie; the ledger has one row."""
    sku = new_sku()
    key = str(uuid.uuid4())
    with project(store, ledger):
        http = client()
        first = post(http, "/orders", key, {"sku": sku})
        again = post(http, "/orders", key, {"sku": sku})
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert json.loads(first.content)["key"] == key
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Content-Type"] == first.headers["Content-Type"] == "application/json"
    assert "session_hint" in first.cookies
    assert "session_hint" not in again.cookies
    assert rows(sku, ledger) == 1


def test_the_same_key_with_another_body_is_422(store: Any) -> None:
    sku = new_sku()
    key = str(uuid.uuid4())
    with project(store):
        http = client()
        assert post(http, "/orders", key, {"sku": sku}).status_code == 201
        other = post(http, "/orders", key, {"sku": sku + "-other"})
    assert other.status_code == 422
    assert other.headers["Content-Type"] == "application/problem+json"
    assert json.loads(other.content)["type"].endswith("key-reused")
    assert rows(sku) == 1
    assert rows(sku + "-other") == 0


def test_a_retry_while_the_first_runs_is_409_then_replayed(store: Any) -> None:
    """The first request is held in its view (it wrote its row); a retry from another thread gets 409 with
    Retry-After and never reaches the view; once the first finishes, the retry is replayed."""
    sku = new_sku()
    key = str(uuid.uuid4())
    gate = GATES.setdefault(sku, Gate())
    try:
        with project(store):
            http = client()
            first = in_thread(lambda: post(http, "/orders", key, {"sku": sku, "gate": sku}))
            assert gate.started.wait(30)
            conflict = post(client(), "/orders", key, {"sku": sku, "gate": sku})
            gate.opened.set()
            done = first.result(timeout=30)
            again = post(client(), "/orders", key, {"sku": sku, "gate": sku})
    finally:
        gate.opened.set()
        GATES.pop(sku, None)
    assert conflict.status_code == 409
    assert conflict.headers["Retry-After"]
    assert done.status_code == 201
    assert again.status_code == 201
    assert again.content == done.content
    assert rows(sku) == 1


def test_two_logged_in_users_sending_the_same_key_each_get_their_own(store: Any) -> None:
    """The principal is the authenticated ``request.user``: the same key from two users runs twice, once each, and
    each user's retry replays their own response, even with another Authorization header."""
    sku = new_sku()
    key = str(uuid.uuid4())
    alice = User.objects.create(username=f"alice-{uuid.uuid4().hex[:8]}")
    bob = User.objects.create(username=f"bob-{uuid.uuid4().hex[:8]}")
    with project(store):
        as_alice, as_bob = client(), client()
        as_alice.force_login(alice)
        as_bob.force_login(bob)
        alices = post(as_alice, "/orders", key, {"sku": sku}, Authorization="Bearer one")
        bobs = post(as_bob, "/orders", key, {"sku": sku})
        alices_again = post(as_alice, "/orders", key, {"sku": sku}, Authorization="Bearer two")
        bobs_again = post(as_bob, "/orders", key, {"sku": sku})
    assert json.loads(alices.content)["user"] == alice.username
    assert json.loads(bobs.content)["user"] == bob.username
    assert alices_again.content == alices.content
    assert alices_again.headers["Idempotent-Replayed"] == "true"
    assert bobs_again.content == bobs.content
    assert bobs_again.headers["Idempotent-Replayed"] == "true"
    assert rows(sku) == 2


def test_outcome_unknown_error_is_503_and_so_are_retries(store: Any) -> None:
    """A view that raises OutcomeUnknownError: Django turns it into a 500, which becomes the 503 outcome-unknown
    problem (process_exception marked it), and the key is kept: the retry gets 503 too and runs nothing."""
    sku = new_sku()
    key = str(uuid.uuid4())
    with project(store):
        http = client()
        first = post(http, "/unknown", key, {"sku": sku})
        again = post(http, "/unknown", key, {"sku": sku})
    for response in (first, again):
        assert response.status_code == 503, response.content
        assert json.loads(response.content)["type"].endswith("outcome-unknown")
        assert response.headers["Retry-After"]
    assert rows(sku) == 1


def test_mark_outcome_unknown_answers_the_view_and_keeps_the_key(store: Any) -> None:
    sku = new_sku()
    key = str(uuid.uuid4())
    with project(store):
        http = client()
        first = post(http, "/mark-unknown", key, {"sku": sku})
        again = post(http, "/mark-unknown", key, {"sku": sku})
    assert first.status_code == 202
    assert again.status_code == 503
    assert rows(sku) == 1


@pytest.mark.parametrize(("path", "status"), [("/fail", 502), ("/boom", 500)])
def test_a_5xx_or_an_exception_releases_the_key(store: Any, path: str, status: int) -> None:
    """A 5xx response, or a view's exception (Django's 500), releases the key: the retry runs the view again."""
    sku = new_sku()
    key = str(uuid.uuid4())
    with project(store):
        http = client()
        first = post(http, path, key, {"sku": sku})
        again = post(http, path, key, {"sku": sku})
    assert first.status_code == again.status_code == status
    assert "Idempotent-Replayed" not in again.headers
    assert rows(sku) == 2


@pytest.mark.parametrize("store_server_errors", [False, True])
def test_an_exception_django_answers_4xx_is_the_apps_answer_and_kept(store_server_errors: bool) -> None:
    """``Http404`` raised by a view is Django's 404, an answer (kept and replayed, as a 404 response is), while an
    exception that ends in a 500 is a failure (released, even with ``store_server_errors``)."""
    sku = new_sku()
    key = str(uuid.uuid4())
    with project("memory://", store_server_errors=store_server_errors):
        http = client()
        first = post(http, "/missing", key, {"sku": sku})
        again = post(http, "/missing", key, {"sku": sku})
        boom = [post(http, "/boom", key + "-boom", {"sku": sku}) for _ in range(2)]
    assert first.status_code == again.status_code == 404
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert [answer.status_code for answer in boom] == [500, 500]
    assert all("Idempotent-Replayed" not in answer.headers for answer in boom)
    assert rows(sku) == 1 + 2  # the 404 once; the 500 twice


@pytest.mark.parametrize("path", ["/stream", "/astream", "/file"])
def test_a_streaming_response_is_recorded(store: Any, path: str) -> None:
    """A StreamingHttpResponse (of a sync or an async iterator) and a FileResponse are recorded as they stream, and
    replayed whole."""
    sku = new_sku()
    key = str(uuid.uuid4())
    with project(store):
        http = client()
        first = post(http, path, key, {"sku": sku})
        body = b"".join(first.streaming_content)
        first.close()
        again = post(http, path, key, {"sku": sku})
    assert first.status_code in (200, 201)
    assert again.status_code == first.status_code
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == body
    assert body.count(b"\n") >= 5
    assert rows(sku) == 1


# -- the face's own parts, on memory ------------------------------------------------------------------------------


def test_the_key_is_on_the_request() -> None:
    with project(MemoryStore().sync()):
        http = client()
        keyed = post(http, "/key", "k-1")
        unkeyed = post(http, "/key", None)
        read = http.get("/key", headers={"Idempotency-Key": "k-2"})
    assert json.loads(keyed.content) == {"key": "k-1"}
    assert json.loads(unkeyed.content) == {"key": None}
    assert json.loads(read.content) == {"key": None}  # GET is not protected


def test_a_stream_left_early_is_read_and_recorded_for_the_retry() -> None:
    """Closed before its end (the client left), the stream is read on and recorded: the retry gets it whole."""
    sku = new_sku()
    with project(MemoryStore().sync()):
        http = client()
        first = post(http, "/stream", "left", {"sku": sku})
        next(iter(first.streaming_content))
        first.close()
        again = post(http, "/stream", "left", {"sku": sku})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content.count(b"\n") == 10
    assert rows(sku) == 1


@pytest.mark.parametrize(
    ("options", "headers", "size", "status"),
    [
        ({}, {"Idempotency-Key": "a,b"}, 10, 400),
        ({"REQUIRE_KEY": True}, {}, 10, 400),
        ({"MAX_REQUEST_BYTES": 100}, {"Idempotency-Key": "big"}, 1000, 413),
    ],
    ids=["comma", "required", "too-large"],
)
def test_refused_requests_never_reach_the_view(
    options: dict[str, Any], headers: dict[str, str], size: int, status: int
) -> None:
    sku = new_sku()
    with project(MemoryStore().sync(), **options):
        response = client().post(
            "/orders",
            data=json.dumps({"sku": sku, "pad": "x" * size}),
            content_type="application/json",
            headers=headers,
        )
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/problem+json"
    assert rows(sku) == 0


def refuse_all(request: Any) -> str:
    msg = "no tenant"
    raise RequestError(msg)


def by_tenant(request: Any) -> str:
    return str(request.headers.get("X-Tenant", ""))


def sku_only(request: Any, body: bytes) -> str:
    return str(json.loads(body)["sku"])


def test_principal_and_fingerprint_by_dotted_path() -> None:
    """PRINCIPAL and FINGERPRINT as dotted paths: two tenants get their own records; the fingerprint over the sku
    alone lets a retry with other fields replay."""
    sku = new_sku()
    with project(
        MemoryStore().sync(),
        PRINCIPAL="tests.test_django.by_tenant",
        FINGERPRINT="tests.test_django.sku_only",
    ):
        http = client()
        first = post(http, "/orders", "t", {"sku": sku}, X_Tenant="a")
        again = post(http, "/orders", "t", {"sku": sku, "note": "retry"}, X_Tenant="a")
        other = post(http, "/orders", "t", {"sku": sku}, X_Tenant="b")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert "Idempotent-Replayed" not in other.headers
    assert rows(sku) == 2


def test_a_principal_that_raises_request_error_is_400() -> None:
    sku = new_sku()
    with project(MemoryStore().sync(), PRINCIPAL=refuse_all):
        response = post(client(), "/orders", "k", {"sku": sku})
    assert response.status_code == 400
    assert "no tenant" in json.loads(response.content)["detail"]
    assert rows(sku) == 0


def test_anonymous_callers_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    with project(MemoryStore().sync()), caplog.at_level(logging.WARNING, "idempo"):
        http = client()
        post(http, "/key", "anon-1")
        post(http, "/key", "anon-2")
    assert sum("no identity" in record.message for record in caplog.records) == 1


@pytest.mark.parametrize(
    ("idempo", "message"),
    [
        (None, "settings.IDEMPO must be a dict"),
        ({"TTL": 60}, "'STORE'] is required"),
        ({"STORE": "memory://", "TTLL": 60}, "unknown keys: TTLL"),
        ({"STORE": "memory://", "TTL": -1}, "ttl=-1"),
        ({"STORE": "nope://"}, "nope"),
        ({"STORE": "memory://", "PRINCIPAL": "tests.test_django.missing"}, "cannot import"),
        ({"STORE": "memory://", "FINGERPRINT": 3}, "must be a callable"),
    ],
    ids=["missing", "no-store", "unknown-key", "bad-option", "bad-url", "bad-path", "not-callable"],
)
def test_settings_errors_are_improperly_configured(idempo: Any, message: str) -> None:
    with override_settings(IDEMPO=idempo), pytest.raises(ImproperlyConfigured, match=message.replace("[", r"\[")):
        client().post("/orders")


def test_settings_are_read_when_the_middleware_is_built_and_the_store_checked() -> None:
    """A store that does not answer fails the build (the worker does not boot); STARTUP_CHECK "warn" builds it."""
    dead = "redis://127.0.0.1:9/0?timeout=0.2"
    with override_settings(IDEMPO={"STORE": dead}), pytest.raises(StoreError, match="does not answer"):
        IdempotencyMiddleware(lambda request: None)
    with override_settings(IDEMPO={"STORE": dead, "STARTUP_CHECK": "warn", "TTL": 5, "METHODS": ["POST"]}):
        middleware = IdempotencyMiddleware(lambda request: None)
    assert middleware.policy.ttl == 5
    assert middleware.policy.methods == frozenset({"POST"})
    with pytest.raises(StoreError):
        middleware.check_store()


def test_the_observer_is_told_each_outcome() -> None:
    seen: list[str] = []

    class Observer:
        def on_request(self, outcome: str, scope: Any) -> None:
            seen.append(outcome)

        def on_store_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
            pass

    sku = new_sku()
    with project(MemoryStore().sync(), OBSERVER=Observer()):
        http = client()
        post(http, "/orders", "o", {"sku": sku})
        post(http, "/orders", "o", {"sku": sku})
        http.get("/health")
    assert seen == ["executed", "replayed", "passthrough"]


def test_concurrent_threads_under_one_key_write_one_row() -> None:
    """Eight threads of one process (Django under a threaded server) send the same keyed POST: one runs."""
    sku = new_sku()
    barrier = threading.Barrier(8)
    with project(MemoryStore().sync()):

        def send() -> int:
            barrier.wait(10)
            status: int = post(client(), "/orders", "threads", {"sku": sku}).status_code
            return status

        statuses = [future.result(timeout=30) for future in [in_thread(send) for _ in range(8)]]
    assert set(statuses) <= {201, 409}
    assert 201 in statuses
    assert rows(sku) == 1


def test_without_django_importing_the_face_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """idempo.django without Django installed: MissingDependency, which says what to install."""
    import importlib
    import sys

    from idempo import MissingDependency

    monkeypatch.delitem(sys.modules, "idempo.django")
    monkeypatch.setitem(sys.modules, "django", None)  # as if it were not installed
    with pytest.raises(MissingDependency, match=r"pip install 'idempo\[django\]'"):
        importlib.import_module("idempo.django")


def test_the_default_principal_is_the_logged_in_users_own_class_and_pk() -> None:
    """request.user is a SimpleLazyObject: the principal names the user's own class, not the wrapper's."""
    from django.contrib.auth.models import AnonymousUser
    from django.test import RequestFactory
    from django.utils.functional import SimpleLazyObject

    from idempo.django import default_principal

    user = User.objects.create(username=f"carol-{uuid.uuid4().hex[:8]}")
    request = RequestFactory().post("/orders", headers={"Authorization": "Bearer t"})
    request.user = SimpleLazyObject(lambda: user)
    assert default_principal(request) == f"user:django.contrib.auth.models.User:{user.pk}".encode()
    request.user = SimpleLazyObject(AnonymousUser)
    assert default_principal(request) == b"authorization:bearer t"
    del request.user  # no AuthenticationMiddleware
    assert default_principal(request) == b"authorization:bearer t"


def test_an_exception_escaping_the_views_releases_the_key_and_is_raised() -> None:
    """Outside Django's own conversion (DEBUG_PROPAGATE_EXCEPTIONS), an exception reaches the middleware: it releases
    the key and re-raises; an OutcomeUnknownError is answered 503 and keeps the key."""
    from django.test import RequestFactory

    from idempo import OutcomeUnknownError

    calls: list[str] = []

    def failing(request: Any) -> Any:
        calls.append("failing")
        msg = "escaped"
        raise RuntimeError(msg)

    def unknown(request: Any) -> Any:
        calls.append("unknown")
        msg = "timed out"
        raise OutcomeUnknownError(msg)

    def answered(request: Any) -> Any:
        from django.http import HttpResponse

        calls.append("answered")
        return HttpResponse(b"done", status=201)

    store = MemoryStore().sync()
    factory = RequestFactory()
    with override_settings(IDEMPO={"STORE": store, "PRINCIPAL": by_tenant}):
        middlewares = {view: IdempotencyMiddleware(view) for view in (failing, unknown, answered)}

    def send(view: Any, key: str) -> Any:
        return middlewares[view](factory.post("/x", b"{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY=key))

    with pytest.raises(RuntimeError, match="escaped"):
        send(failing, "e")
    assert send(answered, "e").status_code == 201  # released: it runs
    assert send(unknown, "u").status_code == 503
    assert send(answered, "u").status_code == 503  # kept: it does not run
    assert calls == ["failing", "answered", "unknown"]
