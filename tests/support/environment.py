"""The servers the suite talks to, and the one rule for a missing one: on a laptop, its tests skip and say what to
install; under ``CI=true`` they fail instead, so that CI can never go green by skipping.

Override the addresses with ``IDEMPO_TEST_REDIS_URL`` and ``IDEMPO_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

from . import in_process

__all__ = ["IN_CI", "POSTGRES_URL", "REDIS_URL", "require_server", "skip_or_fail", "with_options"]

REDIS_URL = os.environ.get("IDEMPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("IDEMPO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message: str) -> NoReturn:
    """Skip the test because *message* (what is missing, and how to get it); under ``CI=true``, fail instead: a
    skip must never hide a missing feature there."""
    __tracebackhide__ = True
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def require_server(url: str, default_port: int, what: str, install: str) -> str:
    """*url* if its server answers; otherwise :func:`skip_or_fail` with what to install. Under ``pytest
    --in-process`` (``make check``), a skip: no test that needs a server runs there."""
    if in_process.enabled():
        in_process.refuse(what)
    if _reachable(url, default_port):
        return url
    skip_or_fail(f"{what} is not reachable at {url}: {install} (or set the URL in the environment)")


def with_options(url: str, **options: object) -> str:
    """*url* with *options* added to its query string."""
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"
