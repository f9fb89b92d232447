"""``IDEMPO["ATOMIC"]``: with the store on the Django database the views write to (``"STORE": "django:<alias>"``),
the middleware runs each keyed request's view inside ``transaction.atomic(using=alias)`` and records the response in
that transaction, so that the view's rows and the completed key commit together; the views have no code for it.
Driven by Django's test client, on the SQLite file (``default``) and on PostgreSQL (``pg``); "exactly once" is
counted in the ledger, and the store calls by an observer (none at completion when the transaction recorded it).
The crash tests, under gunicorn, are ``tests/e2e/test_django_tx_crash.py``."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from idempo import MemoryStore, State
from tests.support import django_setup
from tests.support.stores import new_table

django_setup.setup()

from django.conf import settings as django_settings  # noqa: E402 - Django is configured first
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

import idempo.django  # noqa: E402
from tests.django_project.models import Order  # noqa: E402


class Calls:
    """An observer that keeps the store calls the middleware makes (``claim``, ``renew``, ``complete``,
    ``release``) and each request's outcome."""

    def __init__(self) -> None:
        self.store: list[str] = []
        self.outcomes: list[str] = []

    def on_request(self, outcome: str, scope: Any) -> None:
        self.outcomes.append(outcome)

    def on_store_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
        if operation != "renew":  # a renewal may come from the renewing thread at any time
            self.store.append(operation)

    def take(self) -> list[str]:
        """The store calls since the last ``take``."""
        calls, self.store = self.store, []
        return calls


@pytest.fixture(scope="module")
def pg_ledger(postgres_url: str) -> Iterator[str]:
    """The ``pg`` database's ledger (a schema of the run's own, dropped at the end)."""
    django_setup.create_pg_ledger()
    yield "pg"
    django_setup.drop_pg_ledger()


@pytest.fixture(params=["default", "pg"], ids=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest) -> str:
    """The database the views write orders to and the store keeps its records in: the SQLite file, or PostgreSQL."""
    if request.param == "pg":
        name: str = request.getfixturevalue("pg_ledger")
        return name
    return "default"


class Project:
    """The test project under ``IDEMPO`` settings of a test's own: one client (one middleware, one store)."""

    def __init__(self, ledger: str, calls: Calls) -> None:
        self.ledger = ledger
        self.calls = calls
        self.client = Client(raise_request_exception=False)

    def post(self, path: str, key: str, sku: str, **headers: str) -> Any:
        headers["Idempotency-Key"] = key
        body = json.dumps({"sku": sku})
        return self.client.post(path, data=body, content_type="application/json", headers=headers)

    def rows(self, sku: str) -> int:
        count: int = Order.objects.using(self.ledger).filter(sku=sku).count()
        return count

    @property
    def middleware(self) -> idempo.django.IdempotencyMiddleware:
        """The client's idempo middleware (built at its first request)."""
        assert BUILT, "no request was sent"
        return BUILT[-1]


BUILT: list[idempo.django.IdempotencyMiddleware] = []
"""The middlewares built under :func:`project`, the last one last."""


class Middleware(idempo.django.IdempotencyMiddleware):
    """idempo's middleware, which says when Django builds it."""

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        BUILT.append(self)


@contextmanager
def project(ledger: str, store: Any = None, **options: Any) -> Iterator[Project]:
    """The project with its views writing to *ledger* and ``IDEMPO`` made of *store* (``"django:<ledger>"`` by
    default, in a table of its own) and *options* (upper-cased); an observer counts the store calls. The store's
    connections are closed at the end."""
    calls = Calls()
    if store is None:
        store = f"django:{ledger}?table={new_table()}"
    settings = {"STORE": store, "OBSERVER": calls, **{name.upper(): value for name, value in options.items()}}
    middleware = [*django_settings.MIDDLEWARE[:-1], f"{__name__}.Middleware"]
    BUILT.clear()
    with override_settings(IDEMPO=settings, LEDGER_DATABASE=ledger, MIDDLEWARE=middleware):
        built = Project(ledger, calls)
        try:
            yield built
        finally:
            for each in BUILT:
                each.store.close()


def new_sku() -> str:
    return f"sku-{uuid.uuid4().hex}"


# -- the response recorded in the view's transaction -----------------------------------------------------------------


def test_a_view_writing_a_row_commits_it_with_the_record_and_no_store_call_completes(ledger: str) -> None:
    """The view knows nothing of transactions: its order and the completed key commit together, so the middleware
    makes no store call once the view has answered (the claim is the only one); the retry is replayed."""
    sku = new_sku()
    with project(ledger) as app:
        first = app.post("/orders", "k", sku)
        first_calls = app.calls.take()
        again = app.post("/orders", "k", sku)
        assert app.middleware.database == ledger
    assert first.status_code == again.status_code == 201
    assert first_calls == ["claim"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert app.rows(sku) == 1
    assert app.calls.outcomes == ["executed", "replayed"]


def test_a_view_raising_after_its_insert_rolls_it_back_and_releases_the_key(ledger: str) -> None:
    """``/boom`` writes its order, then raises: Django answers 500, the transaction rolls back (as with
    ATOMIC_REQUESTS), and the key is released: the retry runs the view again, which again leaves no row."""
    sku = new_sku()
    with project(ledger) as app:
        first = app.post("/boom", "k", sku)
        first_calls = app.calls.take()
        again = app.post("/boom", "k", sku)
    assert first.status_code == again.status_code == 500
    assert "Idempotent-Replayed" not in again.headers
    assert first_calls == ["claim", "release"]
    assert app.calls.take() == ["claim", "release"]  # the retry ran: the key was free
    assert app.rows(sku) == 0


def test_an_exception_django_answers_404_rolls_back_and_the_404_is_kept(ledger: str) -> None:
    """``Http404`` raised after the insert: the transaction rolls back (no row), and the 404, the app's answer, is
    recorded after it (a store call) and replayed."""
    sku = new_sku()
    with project(ledger) as app:
        first = app.post("/missing", "k", sku)
        first_calls = app.calls.take()
        again = app.post("/missing", "k", sku)
    assert first.status_code == again.status_code == 404
    assert first_calls == ["claim", "complete"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert app.rows(sku) == 0


def test_a_5xx_returned_commits_the_views_rows_and_releases_the_key(ledger: str) -> None:
    """A 502 the view returns (no exception) commits, as ATOMIC_REQUESTS does; it is not a response that is kept, so
    it is not recorded and the key is released: the retry runs the view again (two rows)."""
    sku = new_sku()
    with project(ledger) as app:
        first = app.post("/fail", "k", sku)
        first_calls = app.calls.take()
        again = app.post("/fail", "k", sku)
    assert first.status_code == again.status_code == 502
    assert first_calls == ["claim", "release"]
    assert app.rows(sku) == 2


def test_a_key_taken_over_before_the_commit_rolls_the_view_back(ledger: str) -> None:
    """``/takeover``: while the view runs, its key is taken over on the store's own connections (as a retry does
    once a lease ran out), then the view writes its order. Recording the response finds the key no longer the
    request's: KeyTakenOverError inside the transaction, which rolls back (no row; Django answers 500), and the
    record stays the intruder's."""
    sku = new_sku()
    with project(ledger) as app:
        response = app.post("/takeover", "k", sku)
        store: Any = app.middleware.store  # a SQL store: it scans (its table is the test's own)
        records = list(store.scan())
    assert response.status_code == 500
    assert app.rows(sku) == 0
    assert [(record.fingerprint, record.state) for record in records] == [("intruder", State.IN_PROGRESS)]


def test_an_outcome_marked_unknown_commits_with_the_unknown_record(ledger: str) -> None:
    """``mark_outcome_unknown()`` then 202: the row and the "outcome unknown" record commit together (no store call
    after the view), and the retry gets the 503 outcome-unknown problem. ``OutcomeUnknownError`` raised: the view's
    row rolls back (an exception), and the key is kept all the same."""
    sku = new_sku()
    with project(ledger) as app:
        marked = app.post("/mark-unknown", "m", sku)
        marked_calls = app.calls.take()
        marked_again = app.post("/mark-unknown", "m", sku)
        raised = app.post("/unknown", "u", sku + "-raised")
        raised_again = app.post("/unknown", "u", sku + "-raised")
    assert marked.status_code == 202
    assert marked_calls == ["claim"]
    assert marked_again.status_code == 503
    assert app.rows(sku) == 1
    assert raised.status_code == raised_again.status_code == 503
    assert json.loads(raised_again.content)["type"].endswith("outcome-unknown")
    assert app.rows(sku + "-raised") == 0


def test_a_streaming_response_commits_first_and_is_recorded_as_it_streams(ledger: str) -> None:
    """A StreamingHttpResponse's body is not known when the transaction commits: the row commits alone, and the
    response is recorded by the usual path as it streams (a store call), then replayed."""
    sku = new_sku()
    with project(ledger) as app:
        first = app.post("/stream", "s", sku)
        body = b"".join(first.streaming_content)
        first.close()
        first_calls = app.calls.take()
        again = app.post("/stream", "s", sku)
    assert first_calls == ["claim", "complete"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == body
    assert app.rows(sku) == 1


def test_views_with_atomic_requests_or_their_own_atomic_blocks(ledger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ATOMIC_REQUESTS on the ledger, and with a view's own ``transaction.atomic()``, those blocks are
    savepoints inside the middleware's transaction: the record commits with the row (no store call after), and a
    view that raises leaves no row."""
    monkeypatch.setitem(connections[ledger].settings_dict, "ATOMIC_REQUESTS", True)
    sku = new_sku()
    with project(ledger) as app:
        first = app.post("/orders", "a", sku)
        again = app.post("/orders", "a", sku)
        own = app.post("/atomic-orders", "o", sku + "-own")
        own_again = app.post("/atomic-orders", "o", sku + "-own")
        boom = app.post("/boom", "b", sku + "-boom")
        calls = app.calls.take()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert own.status_code == 201
    assert own_again.headers["Idempotent-Replayed"] == "true"
    assert boom.status_code == 500
    assert calls == ["claim", "claim", "claim", "claim", "claim", "release"]
    assert app.rows(sku) == app.rows(sku + "-own") == 1
    assert app.rows(sku + "-boom") == 0


def test_atomic_off_is_the_usual_path(ledger: str) -> None:
    """``"ATOMIC": False`` with the same store: the view's writes commit on their own, the middleware completes the
    key after (a store call), and a view that raises after its insert leaves its row (one per run)."""
    sku = new_sku()
    with project(ledger, atomic=False) as app:
        first = app.post("/orders", "k", sku)
        first_calls = app.calls.take()
        again = app.post("/orders", "k", sku)
        boom = [app.post("/boom", "b", sku + "-boom").status_code for _ in range(2)]
        assert app.middleware.database is None
    assert first_calls == ["claim", "complete"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert app.rows(sku) == 1
    assert boom == [500, 500]
    assert app.rows(sku + "-boom") == 2


def test_inside_a_transaction_opened_before_the_middleware_the_record_waits_for_the_request(
    pg_ledger: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that reaches the middleware inside a transaction already open on the database (a middleware listed
    before idempo's, a TestCase): the middleware cannot record in it (it commits after the response), so it warns
    once, runs the view in a savepoint, and completes the key on the store's own connections (PostgreSQL: the record
    is not touched by the outer transaction, which nothing waits for)."""
    monkeypatch.setattr(idempo.django, "_warned_nested", set())
    sku = new_sku()
    with project(pg_ledger) as app, caplog.at_level(logging.WARNING, "idempo"):
        with transaction.atomic(using=pg_ledger):
            first = app.post("/orders", "n", sku)
            boom = app.post("/boom", "b", sku + "-boom")
            inside = app.rows(sku), app.rows(sku + "-boom")
        calls = app.calls.take()
        again = app.post("/orders", "n", sku)
    assert first.status_code == 201
    assert boom.status_code == 500
    assert inside == (1, 0)
    assert calls == ["claim", "complete", "claim", "release"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert app.rows(sku) == 1
    assert sum("inside a transaction already open" in record.message for record in caplog.records) == 1


# -- settings ---------------------------------------------------------------------------------------------------------


def test_a_django_store_is_on_that_database_and_takes_its_options(ledger: str) -> None:
    table = new_table()
    option = "busy_timeout=2" if ledger == "default" else "statement_timeout=2"
    with project(ledger, f"django:{ledger}?table={table}&{option}") as app:
        app.post("/orders", "t", new_sku())
        store = app.middleware.store
    assert type(store).__name__ == ("SyncSQLiteStore" if ledger == "default" else "SyncPostgresStore")
    assert f"table={table!r}" in repr(store)


@pytest.mark.parametrize(
    ("store", "options", "message"),
    [
        ("memory://", {"ATOMIC": True}, "ATOMIC'] = True needs the store in the Django database"),
        ("django:default", {"ATOMIC": "yes"}, "must be True or False"),
        ("django:nowhere", {}, "no database 'nowhere' in settings.DATABASES (known: default, pg)"),
        ("django:default?bogus=1", {}, "'bogus' is not an option of a store on a sqlite database"),
        ("django:default?busy_timeout=soon", {}, "busy_timeout='soon' is not a float"),
    ],
    ids=["atomic-without-django-store", "not-a-bool", "no-such-alias", "unknown-option", "bad-value"],
)
def test_settings_errors_are_improperly_configured(store: str, options: dict[str, Any], message: str) -> None:
    with override_settings(IDEMPO={"STORE": store, **options}), pytest.raises(ImproperlyConfigured) as raised:
        Client().post("/orders")
    assert message in str(raised.value)


def test_atomic_is_off_by_default_with_any_other_store() -> None:
    with project("default", MemoryStore().sync()) as app:
        assert app.post("/orders", "m", new_sku()).status_code == 201
        assert app.middleware.database is None
    assert app.calls.store == ["claim", "complete"]


def test_a_django_store_on_djangos_in_memory_test_database_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Django's test runner puts a SQLite database in memory under a URI name: no store can share it (it would be
    a file of that name, another database), so the middleware is not built."""
    monkeypatch.setitem(connections["default"].settings_dict, "NAME", "file:memorydb_default?mode=memory&cache=shared")
    with override_settings(IDEMPO={"STORE": "django:default"}), pytest.raises(ImproperlyConfigured, match="in-memory"):
        idempo.django.IdempotencyMiddleware(lambda request: None)
