"""The suite's shared fixtures: the servers it talks to (``tests.support.environment`` says what happens when one
is missing: a skip locally, a failure under ``CI=true``), private redis-servers, a Redis Cluster, PostgreSQL tables.
``make test`` runs ``scripts/services`` first, which installs and starts the servers where it can.

The hooks below mark ``external`` the tests that need a server, a browser or several processes, and ``pytest
--in-process`` (``make check``) runs the others only (``tests.support.in_process``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .support import in_process
from .support.environment import POSTGRES_URL, REDIS_URL, require_server
from .support.stores import drop_table, new_table

if TYPE_CHECKING:
    from .support.redis_cluster import RedisServer


# -- make check: the tests that need nothing outside the test process ---------------------------------------------

_EXTERNAL_DIRECTORIES = frozenset({"e2e", "browser"})  # under tests/: worker processes, Chromium


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--in-process",
        action="store_true",
        help="Only the tests that need no server, browser, Node or child process (make check): the ones marked "
        "external are deselected, and any other is skipped where it starts a process or asks for a server.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "external: needs a server, a browser or several processes (set by tests/conftest.py from the fixtures, "
        "the directory and the slow marker); pytest --in-process (make check) leaves it out",
    )
    if config.getoption("--in-process"):
        in_process.enable()


def pytest_unconfigure(config: pytest.Config) -> None:
    in_process.disable()


def _external(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())  # every fixture the test uses, through other fixtures too
    return (
        not in_process.SERVER_FIXTURES.isdisjoint(fixtures)
        or not _EXTERNAL_DIRECTORIES.isdisjoint(item.path.relative_to(item.config.rootpath).parts[:-1])
        or item.get_closest_marker("slow") is not None
        or item.get_closest_marker("external") is not None
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    external = [item for item in items if _external(item)]
    for item in external:
        item.add_marker(pytest.mark.external)
    if config.getoption("--in-process") and external:
        left_out = set(external)
        config.hook.pytest_deselected(items=external)
        items[:] = [item for item in items if item not in left_out]


# -- servers ---------------------------------------------------------------------------------------------------------


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
