"""A small Flask application behind :class:`idempo.flask.Idempotency`, for the Flask tests: with Flask's test client
(``create_app({...})``) and under gunicorn (``tests.flask_app:create_app()``, configured by the environment). Each
request its views execute writes one row to a business database, so that "exactly once" is counted where a real
service would count it.

Configuration (``app.config``; under gunicorn, each from the environment variable of the same name):

- ``IDEMPO_STORE``, and any other ``IDEMPO_*`` key: the extension's, read by ``init_app`` (the app factory pattern:
  the extension is made once, at import, and initialised per application).
- ``BUSINESS_DB``: ``sqlite:///<path>`` or a ``postgresql://`` URL; ``BUSINESS_TABLE``: the table (``orders``).
- ``ORDER_DELAY``: seconds each order's view works before it writes its row (0), so that concurrent requests
  overlap under gunicorn.
- ``GATES``: (test client only) a mapping of order name to a :class:`Gate`, which holds that order's view until
  the test opens it.

Routes:

- ``POST /login``: ``session["user_id"] = <the JSON body's "user">``; the principal is the session's user id
  (:func:`session_principal`, configured as ``IDEMPO_PRINCIPAL = "tests.flask_app:session_principal"``).
- ``POST /orders/<name>``: one row, ``201 {"order_id", "name", "key", "pid", "user", "body"}``; ``g.order_id`` is
  set, and an ``after_request`` hook adds it as ``X-Order-Id``.
- ``POST /stream/orders/<name>``: one row, the same document streamed in three chunks.
- ``POST /unknown/orders/<name>``: one row, then :class:`~idempo.OutcomeUnknownError`.
- ``POST /fail/orders/<name>``: one row, then ``RuntimeError``; ``POST /error/orders/<name>``: one row, then a 502.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request, session

from idempo import OutcomeUnknownError
from idempo.flask import Idempotency
from tests.support.locks import one_process_at_a_time

__all__ = ["Business", "Gate", "create_app", "idempotency", "session_principal"]

idempotency = Idempotency()  # the app factory pattern: configured per application by init_app

orders = Blueprint("orders", __name__)


@dataclass
class Gate:
    """Holds one order's view until the test opens it; ``entered`` is set once the view is waiting."""

    entered: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)


class Business:
    """The business database: one row per executed order (``name``, ``idem_key``, ``user_id``, ``pid``)."""

    def __init__(self, url: str, table: str = "orders") -> None:
        self.url = url
        self.table = table
        if not table.replace("_", "").isalnum():
            msg = f"not a table name: {table!r}"
            raise ValueError(msg)

    def _sqlite(self) -> sqlite3.Connection:
        return sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)

    def _sql(self, statement: str) -> str:
        return statement.replace("{table}", self.table)

    def create(self) -> None:
        """Create the table, if it is not there."""
        if self.url.startswith("sqlite:"):
            with (
                one_process_at_a_time(self.url.removeprefix("sqlite:///") + ".create-lock"),
                _closing(self._sqlite()) as conn,
            ):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    self._sql(
                        "CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                        "idem_key TEXT, user_id TEXT, pid INTEGER NOT NULL)"
                    )
                )
            return
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                self._sql(
                    "CREATE TABLE IF NOT EXISTS {table} (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, "
                    "idem_key TEXT, user_id TEXT, pid INTEGER NOT NULL)"
                )
            )

    def insert(self, name: str, key: str | None, user: str | None) -> int:
        """Write one order's row; its id."""
        row = (name, key, user, os.getpid())
        if self.url.startswith("sqlite:"):
            with _closing(self._sqlite()) as conn:
                cursor = conn.execute(
                    self._sql("INSERT INTO {table} (name, idem_key, user_id, pid) VALUES (?, ?, ?, ?)"), row
                )
                return int(cursor.lastrowid or 0)
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            found = conn.execute(
                self._sql("INSERT INTO {table} (name, idem_key, user_id, pid) VALUES (%s, %s, %s, %s) RETURNING id"),
                row,
            ).fetchone()
            assert found is not None
            return int(found[0])

    def count(self, name: str) -> int:
        """How many rows the order *name* has: how many times it was executed."""
        if self.url.startswith("sqlite:"):
            with _closing(self._sqlite()) as conn:
                (count,) = conn.execute(self._sql("SELECT count(*) FROM {table} WHERE name = ?"), (name,)).fetchone()
                return int(count)
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            found = conn.execute(self._sql("SELECT count(*) FROM {table} WHERE name = %s"), (name,)).fetchone()
            assert found is not None
            return int(found[0])

    def drop(self) -> None:
        """Drop the table (PostgreSQL; a SQLite file goes with its directory)."""
        if not self.url.startswith("sqlite:"):
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(self._sql("DROP TABLE IF EXISTS {table}"))


class _closing:
    """``contextlib.closing`` for a SQLite connection (whose own ``with`` commits, but does not close)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def session_principal(request: object) -> str:
    """The principal: the session's user id (``""`` when nobody logged in: every anonymous caller shares it)."""
    return str(session.get("user_id", ""))


def _business() -> Business:
    business: Business = current_app.extensions["business"]
    return business


def _execute(name: str) -> dict[str, Any]:
    """The order's work: wait at its gate if the test set one, write its row, and describe it."""
    gate: Gate | None = current_app.config.get("GATES", {}).get(name)
    if gate is not None:
        gate.entered.set()
        if not gate.opened.wait(60):
            msg = f"the gate of {name!r} was never opened"
            raise RuntimeError(msg)
    delay = float(current_app.config.get("ORDER_DELAY", 0))
    if delay:
        time.sleep(delay)  # the order's work
    key = g.idempotency_key
    user = session.get("user_id")
    order_id = _business().insert(name, key, user)
    g.order_id = order_id
    body = request.get_data(as_text=True)
    return {"order_id": order_id, "name": name, "key": key, "pid": os.getpid(), "user": user, "body": body}


@orders.post("/login")
def login() -> dict[str, str]:
    user = str((request.get_json(silent=True) or {})["user"])
    session["user_id"] = user
    return {"user": user}


@orders.post("/orders/<name>")
def create_order(name: str) -> tuple[dict[str, Any], int]:
    return _execute(name), 201


@orders.post("/stream/orders/<name>")
def stream_order(name: str) -> Response:
    document = json.dumps(_execute(name)).encode()
    third = len(document) // 3

    def chunks() -> Iterator[bytes]:
        yield document[:third]
        yield document[third : 2 * third]
        yield document[2 * third :]

    return Response(chunks(), status=201, mimetype="application/json")


@orders.post("/unknown/orders/<name>")
def unknown_order(name: str) -> dict[str, Any]:
    _execute(name)
    raise OutcomeUnknownError("the payment provider timed out after the charge was sent")


@orders.post("/fail/orders/<name>")
def failing_order(name: str) -> dict[str, Any]:
    _execute(name)
    raise RuntimeError("the view failed after its write")


@orders.post("/error/orders/<name>")
def erroring_order(name: str) -> tuple[dict[str, Any], int]:
    return _execute(name), 502


@orders.after_app_request
def order_header(response: Response) -> Response:
    """An app's own after_request hook: its header is part of the response idempo records and replays."""
    order_id = g.get("order_id")
    if order_id is not None:
        response.headers["X-Order-Id"] = str(order_id)
    return response


_ENVIRONMENT = ("BUSINESS_DB", "BUSINESS_TABLE", "IDEMPO_STORE", "IDEMPO_PRINCIPAL", "ORDER_DELAY")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The application, configured by *config*, else by the environment (gunicorn: ``tests.flask_app:create_app()``)."""
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "flask-app-tests"
    app.config["BUSINESS_TABLE"] = "orders"
    if config is None:
        app.config.update({name: os.environ[name] for name in _ENVIRONMENT if name in os.environ})
    else:
        app.config.update(config)
    business = Business(app.config["BUSINESS_DB"], app.config["BUSINESS_TABLE"])
    business.create()
    app.extensions["business"] = business
    app.register_blueprint(orders)
    idempotency.init_app(app)
    return app
