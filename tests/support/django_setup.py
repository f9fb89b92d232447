"""Django in the test process: the test project (``tests.django_project``) configured once, its databases, and
:func:`django_app`, a WSGI application of a urls module of one's choice behind ``idempo.django``'s middleware
configured from keyword options (the hook the shared contract suite runs its scenarios through).

Django is configured once per process: :func:`setup` does it (every function here calls it first), with the
``default`` database on a SQLite file of a temporary directory of its own (users, sessions and the ledger, migrated
at once; the directory is removed at exit) and the ``pg`` database on a PostgreSQL schema of its own, made by
:func:`create_pg_ledger` and dropped by :func:`drop_pg_ledger`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from typing import Any

__all__ = ["create_pg_ledger", "django_app", "drop_pg_ledger", "idempo_settings", "setup"]

SETTINGS_MODULE = "tests.django_project.settings"
_state: dict[str, str] = {}


def setup() -> None:
    """Configure Django for this process with the test project's settings and migrate its SQLite database; once."""
    if _state:
        return
    import django
    from django.core.management import call_command

    directory = tempfile.mkdtemp(prefix="idempo-django-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["IDEMPO_DJANGO_SQLITE"] = os.path.join(directory, "ledger.sqlite3")
    os.environ["IDEMPO_DJANGO_PG_SCHEMA"] = f"idempo_django_{uuid.uuid4().hex[:12]}"
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0, database="default")
    _state["sqlite"] = os.environ["IDEMPO_DJANGO_SQLITE"]
    _state["schema"] = os.environ["IDEMPO_DJANGO_PG_SCHEMA"]


def sqlite_path() -> str:
    """The SQLite file of the ``default`` database (a server started by a test may share it)."""
    setup()
    return _state["sqlite"]


def pg_schema() -> str:
    """The PostgreSQL schema of the ``pg`` database."""
    setup()
    return _state["schema"]


def create_pg_ledger() -> None:
    """Make the ``pg`` database's schema and its ledger table (the PostgreSQL server must be there)."""
    from django.db import connections

    from tests.django_project.models import Order

    connection = connections["pg"]
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE SCHEMA IF NOT EXISTS "{pg_schema()}"')
    with connection.schema_editor() as editor:
        editor.create_model(Order)


def drop_pg_ledger() -> None:
    """Drop the ``pg`` database's schema, and close every connection to it."""
    from django.db import connections

    connection = connections["pg"]
    with connection.cursor() as cursor:
        cursor.execute(f'DROP SCHEMA IF EXISTS "{pg_schema()}" CASCADE')
    connection.close()


def idempo_settings(**options: Any) -> dict[str, Any]:
    """``settings.IDEMPO`` from keyword options: ``store=...`` (or ``STORE=...``), ``principal=``, ``fingerprint=``,
    ``observer=`` and every field of :class:`idempo.Policy` by name, in either case (``ttl=60`` is ``"TTL": 60``)."""
    return {name.upper(): value for name, value in options.items()}


def django_app(urls_module: str = "tests.django_project.urls", **options: Any) -> Any:
    """A WSGI application (``django.core.handlers.wsgi.WSGIHandler``) serving *urls_module* behind the test
    project's middlewares (sessions, authentication, then ``idempo.django.IdempotencyMiddleware``), with
    ``settings.IDEMPO`` made from *options* (:func:`idempo_settings`: ``store=`` is required; ``ttl=``,
    ``on_conflict=``, ... as for the WSGI middleware).

    The middleware is built here, once (its start-up check included), under ``override_settings(IDEMPO=...)``;
    each request is resolved against *urls_module* (``request.urlconf``), so that several applications, each with
    its own options and views, live in one process. Drive it like any WSGI callable (``httpx.WSGITransport``,
    ``werkzeug.test.Client``); a view finds the key in ``request.idempotency_key``.

    Raises:
        django.core.exceptions.ImproperlyConfigured: options the middleware refuses.
    """
    setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    class Handler(WSGIHandler):  # type: ignore[misc]  # Django ships no type hints
        def get_response(self, request: Any) -> Any:
            request.urlconf = urls_module
            return super().get_response(request)

    with override_settings(IDEMPO=idempo_settings(**options)):
        return Handler()
