"""The Flask extension (:mod:`idempo.flask`) through Flask's test client, on every store: the application of
``tests/flask_app`` writes one row per executed order to a business database (a SQLite file; PostgreSQL in one
test), which is what "exactly once" is counted in."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flask
import pytest
from werkzeug.test import TestResponse

import idempo
from idempo import ConfigurationError, StoreError
from idempo.flask import Idempotency
from idempo.stores import SyncScanningStore, sync_store_from_url

from .flask_app import Business, Gate, create_app
from .support.flask_setup import extension_of, flask_app, flask_from_wsgi
from .support.processes import free_port

KEY = "Idempotency-Key"


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each kind of store: Redis under a prefix of the test's own, PostgreSQL in a table of its own."""
    kind: str = request.param
    if kind == "memory":
        yield "memory://"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'idempo.db'}"
    elif kind == "redis":
        base: str = request.getfixturevalue("redis_url")
        url = f"{base}{'&' if '?' in base else '?'}prefix=idempo-test-flask-{uuid.uuid4().hex[:12]}:"
        yield url
        store = sync_store_from_url(url)
        assert isinstance(store, SyncScanningStore)
        for record in store.scan():
            store.delete(record.key)
        store.close()
    else:
        table: str = request.getfixturevalue("table")
        yield f"{request.getfixturevalue('postgres_url')}?table={table}"


def make_app(tmp_path: Path, store: str = "memory://", **config: Any) -> tuple[flask.Flask, Business]:
    """The test application on *store*, its business database a SQLite file of the test's own."""
    app = create_app({"BUSINESS_DB": f"sqlite:///{tmp_path / 'business.db'}", "IDEMPO_STORE": store, **config})
    business: Business = app.extensions["business"]
    return app, business


def post(client: Any, path: str, key: str | None = None, **kwargs: Any) -> TestResponse:
    """POST *path*, with *key* if given; the whole body read (the test client's responses stream lazily)."""
    headers = {**kwargs.pop("headers", {}), **({KEY: key} if key is not None else {})}
    response: TestResponse = client.post(path, headers=headers, **kwargs)
    response.get_data()
    response.close()
    return response


def new_key() -> str:
    return str(uuid.uuid4())


# -- the contract on every store -------------------------------------------------------------------------------------


def test_a_retry_is_replayed_byte_for_byte(store_url: str, tmp_path: Path) -> None:
    """A keyed POST runs once (one row); its retry gets the same bytes, the app's own after_request header
    included, with Idempotent-Replayed; the view found the key in flask.g.idempotency_key."""
    app, business = make_app(tmp_path, store_url)
    client = app.test_client()
    key = new_key()
    first = post(client, "/orders/a", key, json={"sku": "x"})
    again = post(client, "/orders/a", key, json={"sku": "x"})
    assert first.status_code == 201, first.text
    assert first.json is not None
    assert first.json["key"] == key
    assert business.count("a") == 1
    assert again.status_code == 201
    assert again.data == first.data
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-order-id"] == first.headers["x-order-id"] == str(first.json["order_id"])
    assert again.headers["content-type"] == first.headers["content-type"]
    assert "idempotent-replayed" not in first.headers


def test_another_body_under_the_key_is_422(store_url: str, tmp_path: Path) -> None:
    app, business = make_app(tmp_path, store_url)
    client = app.test_client()
    key = new_key()
    assert post(client, "/orders/b", key, json={"sku": "x"}).status_code == 201
    other = post(client, "/orders/b", key, json={"sku": "y"})
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert business.count("b") == 1


def test_a_retry_while_the_first_runs_is_409(store_url: str, tmp_path: Path) -> None:
    """The first request is held inside its view (a gate); the retry, meanwhile, gets 409 with Retry-After; the first
    then completes, and one row is written."""
    gate = Gate()
    app, business = make_app(tmp_path, store_url, GATES={"c": gate})
    key = new_key()
    with ThreadPoolExecutor(1) as pool:
        first: Future[TestResponse] = pool.submit(post, app.test_client(), "/orders/c", key, json={})
        assert gate.entered.wait(30), "the first request never reached its view"
        try:
            retry = post(app.test_client(), "/orders/c", key, json={})
        finally:
            gate.opened.set()
        assert first.result(timeout=30).status_code == 201
    assert retry.status_code == 409
    assert retry.headers["content-type"] == "application/problem+json"
    assert int(retry.headers["retry-after"]) >= 1
    assert business.count("c") == 1


def test_an_unknown_outcome_is_503_and_keeps_the_key(store_url: str, tmp_path: Path) -> None:
    """OutcomeUnknownError raised by the view: 503 outcome-unknown (not Flask's 500), and every retry gets it too
    without running the view again; with PROPAGATE_EXCEPTIONS (testing) as well."""
    for propagate in (False, True):
        app, business = make_app(tmp_path, store_url, PROPAGATE_EXCEPTIONS=propagate)
        client = app.test_client()
        key = new_key()
        name = f"unknown-{propagate}"
        first = post(client, f"/unknown/orders/{name}", key, json={})
        retry = post(client, f"/unknown/orders/{name}", key, json={})
        for response in (first, retry):
            assert response.status_code == 503, response.text
            assert response.json is not None
            assert response.json["type"] == "urn:idempo:problem:outcome-unknown"
        assert business.count(name) == 1


def test_exceptions_and_5xx_release_the_key(store_url: str, tmp_path: Path) -> None:
    """An exception (Flask's 500, or re-raised with PROPAGATE_EXCEPTIONS) or a 5xx the view answers releases the
    key: the retry runs the view again."""
    app, business = make_app(tmp_path, store_url)
    client = app.test_client()
    key = new_key()
    assert post(client, "/fail/orders/f", key, json={}).status_code == 500
    assert post(client, "/fail/orders/f", key, json={}).status_code == 500
    assert business.count("f") == 2
    key = new_key()
    assert post(client, "/error/orders/e", key, json={}).status_code == 502
    assert post(client, "/error/orders/e", key, json={}).status_code == 502
    assert business.count("e") == 2
    app.config["PROPAGATE_EXCEPTIONS"] = True
    key = new_key()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the view failed"):
            post(client, "/fail/orders/p", key, json={})
    assert business.count("p") == 2
    assert post(client, "/orders/p", key, json={}).status_code == 201  # the key is free: a new request under it


def test_a_streamed_response_is_recorded(store_url: str, tmp_path: Path) -> None:
    app, business = make_app(tmp_path, store_url)
    client = app.test_client()
    key = new_key()
    first = post(client, "/stream/orders/s", key, json={})
    again = post(client, "/stream/orders/s", key, json={})
    assert first.status_code == again.status_code == 201
    assert "content-length" not in first.headers  # it went out as a stream
    assert again.data == first.data
    assert first.json is not None
    assert first.json["name"] == "s"
    assert again.headers["idempotent-replayed"] == "true"
    assert business.count("s") == 1


# -- Flask's side ----------------------------------------------------------------------------------------------------


def test_the_principal_from_the_session(tmp_path: Path) -> None:
    """Two users logged in through the session, one key: two namespaces, two rows; each user's retry is replayed.
    The principal is configured by its dotted path (IDEMPO_PRINCIPAL)."""
    app, business = make_app(tmp_path, IDEMPO_PRINCIPAL="tests.flask_app:session_principal")
    alice, bob = app.test_client(), app.test_client()
    assert post(alice, "/login", json={"user": "alice"}).status_code == 200
    assert post(bob, "/login", json={"user": "bob"}).status_code == 200
    key = new_key()
    for_alice = post(alice, "/orders/shared", key, json={})
    for_bob = post(bob, "/orders/shared", key, json={})
    alice_again = post(alice, "/orders/shared", key, json={})
    assert for_alice.json is not None
    assert for_alice.json["user"] == "alice"
    assert for_bob.json is not None
    assert for_bob.json["user"] == "bob"
    assert "idempotent-replayed" not in for_bob.headers
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.data == for_alice.data
    assert business.count("shared") == 2


def test_the_key_is_none_without_one(tmp_path: Path) -> None:
    app, business = make_app(tmp_path)
    client = app.test_client()
    first = post(client, "/orders/n", json={})
    second = post(client, "/orders/n", json={})
    assert first.json is not None
    assert first.json["key"] is None
    assert business.count("n") == 2
    assert "idempotent-replayed" not in second.headers


def test_refusals_before_the_view(tmp_path: Path) -> None:
    """A key with a comma (two keys joined) is 400, a body over max_request_bytes 413 (declared or chunked), a
    missing key where one is required 400: the view does not run."""
    app, business = make_app(tmp_path, IDEMPO_MAX_REQUEST_BYTES=10, IDEMPO_REQUIRE_KEY=True)
    client = app.test_client()
    assert post(client, "/orders/r", "a,b", json={}).status_code == 400
    assert post(client, "/orders/r", new_key(), data=b"x" * 11).status_code == 413
    unsized = {"wsgi.input": io.BytesIO(b"x" * 11), "wsgi.input_terminated": True, "CONTENT_LENGTH": ""}
    chunked = post(client, "/orders/r", new_key(), environ_overrides=unsized)
    assert chunked.status_code == 413
    assert post(client, "/orders/r", json={}).status_code == 400
    assert business.count("r") == 0
    assert post(client, "/orders/r", new_key(), data=b"x" * 10).status_code == 201


def test_the_app_factory_pattern(tmp_path: Path) -> None:
    """One extension, made at import (tests.flask_app.idempotency), initialised for two applications with their own
    configuration; arguments win over app.config."""
    first = create_app({"BUSINESS_DB": f"sqlite:///{tmp_path / 'one.db'}", "IDEMPO_STORE": "memory://"})
    second = create_app(
        {"BUSINESS_DB": f"sqlite:///{tmp_path / 'two.db'}", "IDEMPO_STORE": "memory://", "IDEMPO_TTL": 60}
    )
    extension = extension_of(first)
    assert extension is extension_of(second)
    with first.app_context():
        assert extension.policy.ttl == 86_400
    with second.app_context():
        assert extension.policy.ttl == 60
        assert extension.store is not None
    key = new_key()
    assert post(first.test_client(), "/orders/f", key, json={}).status_code == 201
    assert "idempotent-replayed" not in post(second.test_client(), "/orders/f", key, json={}).headers

    app = flask.Flask("arguments")
    app.config.update(IDEMPO_STORE="sqlite:///nowhere/never.db", IDEMPO_TTL=100, IDEMPO_LEASE=9)
    extension = Idempotency(app, store="memory://", ttl=5)
    with app.app_context():
        assert extension.policy.ttl == 5
        assert extension.policy.lease == 9
    assert app.extensions["idempo"] is extension


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="IDEMPO_STORE"):
        Idempotency(flask.Flask("no_store"))
    app = flask.Flask("typo")
    app.config.update(IDEMPO_STORE="memory://", IDEMPO_LEASES=3)
    with pytest.raises(ConfigurationError, match="IDEMPO_LEASES"):
        Idempotency(app)
    app = flask.Flask("range")
    app.config.update(IDEMPO_STORE="memory://", IDEMPO_LEASE=-1)
    with pytest.raises(ConfigurationError):
        Idempotency(app)
    app = flask.Flask("principal")
    app.config.update(IDEMPO_STORE="memory://", IDEMPO_PRINCIPAL="tests.flask_app:no_such_function")
    with pytest.raises(ConfigurationError, match="no_such_function"):
        Idempotency(app)
    with pytest.raises(ConfigurationError, match="callable"):
        Idempotency(flask.Flask("not_callable"), store="memory://", principal=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Idempotency(flask.Flask("scheme"), store="nosuch://x")
    unbound = Idempotency(store="memory://")
    with pytest.raises(ConfigurationError, match="init_app"):
        unbound.check_store()


def test_the_start_up_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """init_app asks the store once: one that does not answer stops it (startup_check="fail"), or is logged."""
    pytest.importorskip("redis")
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError, match="does not answer"):
        Idempotency(flask.Flask("down"), store=nowhere)
    with caplog.at_level(logging.WARNING, logger="idempo"):
        extension = Idempotency(flask.Flask("warn"), store=nowhere, startup_check="warn")
    assert "starting anyway" in caplog.text
    with pytest.raises(StoreError):
        extension.check_store()


def test_a_principal_that_refuses_is_400(tmp_path: Path) -> None:
    def refuse(request: flask.Request) -> str:
        raise idempo.RequestError("who are you?")

    app = flask_app({"/x": lambda: "ran"}, principal=refuse)
    response = post(app.test_client(), "/x", new_key())
    assert response.status_code == 400
    assert response.json is not None
    assert "who are you?" in response.json["detail"]


def test_fail_open_runs_the_view_unprotected(tmp_path: Path) -> None:
    """A store that fails on the claim: 503 (fail_closed), or the view runs with the key (fail_open)."""
    pytest.importorskip("redis")
    store = sync_store_from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    runs: list[object] = []

    def view() -> str:
        runs.append(flask.g.idempotency_key)
        return "ran"

    closed = flask_app({"/x": view}, store=store, startup_check="off")
    assert post(closed.test_client(), "/x", new_key()).status_code == 503
    opened = flask_app({"/x": view}, store=store, startup_check="off", on_store_error="fail_open")
    key = new_key()
    assert post(opened.test_client(), "/x", key).status_code == 200
    assert runs == [key]


def test_a_wsgi_app_inside_a_view(tmp_path: Path) -> None:
    """tests.support.flask_setup.flask_from_wsgi: a plain WSGI app (here a streaming one) behind the extension."""
    runs: list[bytes] = []

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        body = environ["wsgi.input"].read()
        runs.append(body)
        start_response("201 Created", [("Content-Type", "text/plain")])
        yield b"key=" + str(environ["idempo.key"]).encode()
        yield b" body=" + body

    client = flask_from_wsgi(wsgi_app).test_client()
    key = new_key()
    first = post(client, "/any/path", key, data=b"hello")
    again = post(client, "/any/path", key, data=b"hello")
    assert first.data == f"key={key} body=hello".encode()
    assert again.data == first.data
    assert again.headers["idempotent-replayed"] == "true"
    assert runs == [b"hello"]


def test_postgresql_business_database(postgres_url: str, table: str, tmp_path: Path) -> None:
    """The business rows in PostgreSQL (the store there too): one row for a keyed POST and its retry."""
    app = create_app(
        {
            "BUSINESS_DB": postgres_url,
            "BUSINESS_TABLE": f"{table}_orders",
            "IDEMPO_STORE": f"{postgres_url}?table={table}",
        }
    )
    business: Business = app.extensions["business"]
    try:
        client = app.test_client()
        key = new_key()
        first = post(client, "/orders/pg", key, json={})
        again = post(client, "/orders/pg", key, json={})
        assert again.data == first.data
        assert business.count("pg") == 1
    finally:
        business.drop()


def test_the_core_imports_without_flask() -> None:
    """``import idempo`` does not import idempo.flask; importing idempo.flask without Flask says what to install."""
    script = (
        "import sys\n"
        "sys.modules['flask'] = None\n"
        "import idempo\n"
        "assert 'idempo.flask' not in sys.modules\n"
        "try:\n"
        "    import idempo.flask\n"
        "except idempo.MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "pip install 'idempo[flask]'" in result.stdout


def test_an_exception_releases_even_when_5xx_are_stored(tmp_path: Path) -> None:
    """With store_server_errors, a 502 the view answers is stored and replayed, but Flask's 500 for an exception is
    not the app's answer: the key is released (the got_request_exception signal), with and without propagation."""
    app, business = make_app(tmp_path, IDEMPO_STORE_SERVER_ERRORS=True)
    client = app.test_client()
    key = new_key()
    assert post(client, "/error/orders/kept", key, json={}).status_code == 502
    assert post(client, "/error/orders/kept", key, json={}).headers["idempotent-replayed"] == "true"
    assert business.count("kept") == 1
    key = new_key()
    assert post(client, "/fail/orders/released", key, json={}).status_code == 500
    assert post(client, "/fail/orders/released", key, json={}).status_code == 500
    assert business.count("released") == 2


def test_a_500_after_mark_outcome_unknown_is_503(tmp_path: Path) -> None:
    """A view that says its outcome is unknown and answers 500 (or whose exception a handler of the app's turned
    into a 500) gets the 503 outcome-unknown problem, and the key is kept."""
    runs: list[str] = []

    def view() -> tuple[str, int]:
        runs.append("ran")
        idempo.mark_outcome_unknown()
        return "provider timed out", 500

    client = flask_app({"/charge": view}).test_client()
    key = new_key()
    for _ in range(2):
        response = post(client, "/charge", key)
        assert response.status_code == 503
        assert response.json is not None
        assert response.json["type"] == "urn:idempo:problem:outcome-unknown"
    assert runs == ["ran"]
