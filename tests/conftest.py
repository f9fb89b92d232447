"""The suite's shared fixtures: the servers it talks to (``tests.support.environment`` says what happens when one
is missing: a skip locally, a failure under ``CI=true``), private redis-servers, a Redis Cluster, PostgreSQL tables.
``make test`` runs ``scripts/services`` first, which installs and starts the servers where it can.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .support.environment import POSTGRES_URL, REDIS_URL, require_server
from .support.stores import drop_table, new_table

if TYPE_CHECKING:
    from .support.redis_cluster import RedisServer


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A running Redis (``make test`` starts one; else ``apt-get install redis-server``)."""
    return require_server(REDIS_URL, 6379, "Redis", "run 'make services' or 'apt-get install redis-server'")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A running PostgreSQL with a ``test`` database that user ``postgres`` may use without a password."""
    return require_server(POSTGRES_URL, 5432, "PostgreSQL", "run 'make services' or 'apt-get install postgresql'")


@pytest.fixture(scope="module")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-node Redis Cluster of the test module's own, started once and killed at the end."""
    from .support.redis_cluster import redis_cluster

    with redis_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may kill, pause, restart or flush."""
    from .support.redis_cluster import RedisServer

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
