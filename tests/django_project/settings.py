"""The test project's settings, from the environment (so that a gunicorn or uvicorn serving it is configured by the
test that starts it):

- ``IDEMPO_DJANGO_SQLITE``: the SQLite file of the ``default`` database (users, sessions, the ledger).
- ``IDEMPO_DJANGO_PG_SCHEMA``: the PostgreSQL schema of the ``pg`` database (the ledger only), one per test run.
- ``IDEMPO_DJANGO_LEDGER``: the database the views write orders to, ``default`` or ``pg`` (``LEDGER_DATABASE``).
- ``IDEMPO_DJANGO_STORE``: idempo's store (``IDEMPO["STORE"]``), ``memory://`` by default.
- ``IDEMPO_DJANGO_LEASE``: idempo's lease, in seconds (30 by default).
- ``IDEMPO_DJANGO_ATOMIC``: idempo's ``IDEMPO["ATOMIC"]``, ``1`` or ``0`` (unset: its default).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tests.support.environment import POSTGRES_URL

SECRET_KEY = "idempo-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.django_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "tests.django_project",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "idempo.django.IdempotencyMiddleware",
]

_pg = urlsplit(POSTGRES_URL)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("IDEMPO_DJANGO_SQLITE", "ledger.sqlite3"),
        "OPTIONS": {"timeout": 20},
    },
    "pg": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _pg.path.lstrip("/") or "test",
        "USER": _pg.username or "postgres",
        "PASSWORD": _pg.password or "",
        "HOST": _pg.hostname or "127.0.0.1",
        "PORT": str(_pg.port or 5432),
        "OPTIONS": {"options": f"-c search_path={os.environ.get('IDEMPO_DJANGO_PG_SCHEMA', 'public')}"},
    },
}
LEDGER_DATABASE = os.environ.get("IDEMPO_DJANGO_LEDGER", "default")

IDEMPO: dict[str, object] = {
    "STORE": os.environ.get("IDEMPO_DJANGO_STORE", "memory://"),
    "LEASE": float(os.environ.get("IDEMPO_DJANGO_LEASE", "30")),
}
if "IDEMPO_DJANGO_ATOMIC" in os.environ:
    IDEMPO["ATOMIC"] = os.environ["IDEMPO_DJANGO_ATOMIC"] == "1"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {"django.request": {"handlers": ["null"], "propagate": False}},  # the 500s the tests cause
}
