"""Servers the suite talks to. On a laptop without them, their tests skip and say what to install; under
``CI=true`` they fail instead, so that CI can never go green by skipping. ``make test`` runs ``scripts/services``
first, which installs and starts them where it can.

Override the addresses with ``IDEMPO_TEST_REDIS_URL`` and ``IDEMPO_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from .stores_support import drop_table, new_table

if TYPE_CHECKING:
    from .redis_cluster import RedisServer

REDIS_URL = os.environ.get("IDEMPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("IDEMPO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def require_server(url: str, default_port: int, what: str, install: str) -> str:
    """*url* if its server answers; otherwise skip (fail under CI) with what to install."""
    if _reachable(url, default_port):
        return url
    message = f"{what} is not reachable at {url}: {install} (or set the URL in the environment)"
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A running Redis (``make test`` starts one; else ``apt-get install redis-server``)."""
    return require_server(REDIS_URL, 6379, "Redis", "run 'make services' or 'apt-get install redis-server'")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A running PostgreSQL with a ``test`` database that user ``postgres`` may use without a password."""
    return require_server(POSTGRES_URL, 5432, "PostgreSQL", "run 'make services' or 'apt-get install postgresql'")


def with_options(url: str, **options: object) -> str:
    """*url* with *options* added to its query string."""
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.fixture(scope="module")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-node Redis Cluster of the test module's own, started once and killed at the end."""
    from .redis_cluster import redis_cluster  # it imports this module

    with redis_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may kill, pause, restart or flush."""
    from .redis_cluster import RedisServer

    server = RedisServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def table(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL table name, dropped at the end of the test."""
    name = new_table()
    yield name
    drop_table(postgres_url, name)
