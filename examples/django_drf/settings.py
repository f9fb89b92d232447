"""The example's settings. Its databases live in ``DRF_EXAMPLE_DIR`` (the current directory by default)."""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("DRF_EXAMPLE_DIR", "."))

SECRET_KEY = "example-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "examples.django_drf.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(DATA / "shop.sqlite3")}}
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "rest_framework",
    "examples.django_drf",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "idempo.django.IdempotencyMiddleware",  # after AuthenticationMiddleware: request.user is the principal
]
IDEMPO = {
    "STORE": f"sqlite:///{DATA / 'idempo.db'}",  # in production: redis://... or postgresql://..., shared by workers
    "TTL": 24 * 3600,
    "REQUIRE_KEY": lambda path: path.startswith("/api/"),
}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}
