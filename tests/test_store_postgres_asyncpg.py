"""What only the async PostgresStore has, on asyncpg: its connection strings (libpq's, as asyncpg takes them), its
SQL in the positional style, its connection pool (``_postgres_pool``), and a fork from inside a running event loop.
The store's contract, races, failures and recovery are in ``test_store_postgres.py``, run on both stores.

Against a real PostgreSQL server; the pool's outages through the test's own TCP proxy (``Proxy``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

from idempo import ConfigurationError, StoreError
from idempo.stores._postgres_asyncpg import FAILURES, asyncpg_dsn, connect
from idempo.stores._postgres_pool import Pool, Pooled, PoolTimeout
from idempo.stores._postgres_sql import Statements, positional
from idempo.stores.postgres import PostgresStore
from tests.support.stores import token_of
from tests.test_store_postgres import Proxy, through

HANG_GUARD = 60.0


async def eventually(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll *condition*, yielding the event loop between looks, until it holds (else fail after *within* s)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


# -- connection strings ---------------------------------------------------------------------------------------------


def dsn_of(conninfo: str) -> str:
    return asyncpg_dsn(conninfo_to_dict(conninfo), conninfo)


def query_of(conninfo: str) -> dict[str, str]:
    """The libpq parameters asyncpg is given for *conninfo*: its URL's query (asyncpg's URL has nothing else)."""
    dsn = dsn_of(conninfo)
    assert dsn.partition("?")[0] == "postgresql://"
    return dict(parse_qsl(dsn.partition("?")[2], strict_parsing=bool(dsn.partition("?")[2])))


def test_a_url_becomes_asyncpgs_query_and_the_stores_own_are_left_out() -> None:
    assert query_of(
        "postgresql://app:p%40ss@db:5433/idem?sslmode=verify-full&sslrootcert=/ca.pem&application_name=api"
        "&connect_timeout=3&options=-c%20search_path%3Dapp&target_session_attrs=read-write"
    ) == {
        "user": "app",
        "password": "p@ss",
        "dbname": "idem",
        "host": "db",
        "port": "5433",
        "sslmode": "verify-full",
        "sslrootcert": "/ca.pem",
        "options": "-c search_path=app",
        "target_session_attrs": "read-write",
    }


def test_key_value_pairs_and_a_host_address() -> None:
    assert query_of("host=/run/postgresql dbname=app user=me") == {
        "host": "/run/postgresql",
        "dbname": "app",
        "user": "me",
    }
    assert query_of("hostaddr=10.0.0.5 dbname=app") == {"host": "10.0.0.5", "dbname": "app"}
    assert dsn_of("") == "postgresql://"  # libpq's environment variables and defaults, which asyncpg reads too


def test_tuning_asyncpg_has_no_form_of_is_ignored() -> None:
    assert query_of(
        "host=db keepalives=1 keepalives_idle=30 tcp_user_timeout=1000 gssencmode=disable channel_binding=prefer"
        " client_encoding=UTF8 sslsni=1 fallback_application_name=x"
    ) == {"host": "db"}


@pytest.mark.parametrize(
    ("conninfo", "refused"),
    [
        ("host=db gssencmode=require", "gssencmode=require"),
        ("host=db channel_binding=require", "channel_binding=require"),
        ("host=db client_encoding=LATIN1", "client_encoding=LATIN1"),
        ("host=db requirepeer=postgres", "requirepeer"),
        ("host=db replication=database", "replication"),
    ],
)
def test_a_requirement_asyncpg_cannot_meet_is_a_configuration_error(conninfo: str, refused: str) -> None:
    with pytest.raises(ConfigurationError, match=f"cannot take the libpq parameter\\(s\\) {refused}"):
        PostgresStore(f"{conninfo} password=s3cr3t")
    with pytest.raises(ConfigurationError) as raised:
        PostgresStore(f"postgresql://u:s3cr3t@db/app?{refused.replace(' ', '&')}")
    assert "s3cr3t" not in str(raised.value)


async def test_the_server_settings_are_the_stores(postgres_url: str, table: str) -> None:
    """statement_timeout and application_name in the startup message, and libpq's options passed on to the
    server, from key=value pairs as from a URL."""
    parts = urlsplit(postgres_url)
    conninfo = (
        f"host={parts.hostname} port={parts.port or 5432} dbname={parts.path.lstrip('/')} user={parts.username}"
        " options='-c work_mem=5MB'"
    )
    store = PostgresStore(conninfo, table=table, statement_timeout=2.5, application_name="idempo-settings")
    try:
        assert await store.get("k") is None
        assert store._pool is not None
        pooled = store._pool.free_connection()
        assert pooled is not None
        try:
            row = await pooled.conn.fetchrow(
                "SELECT current_setting('statement_timeout'), current_setting('application_name'),"
                " current_setting('work_mem')"
            )
        finally:
            store._pool.putconn(pooled)
        assert tuple(row) == ("2500ms", "idempo-settings", "5MB")
    finally:
        await store.close()


# -- the SQL, positional --------------------------------------------------------------------------------------------


def test_named_parameters_become_positional_ones_in_order_of_first_use() -> None:
    assert positional(b"SELECT %(b)s, %(a)s, %(b)s, '100%%'") == ("SELECT $1, $2, $1, '100%'", ("b", "a"))
    statements = Statements("t")
    sql, names = statements.positional[statements.claim]
    assert names == ("now", "key", "fingerprint", "token", "lease", "ttl")
    assert "%" not in sql
    assert sql.count("$2") == 2  # the key, in the read and in the insert
    named = [value for value in vars(statements).values() if isinstance(value, bytes) and b"%(" in value]
    assert set(named) <= set(statements.positional)  # every statement with parameters, in both styles


def test_a_statement_taken_with_its_parameters_in_order_must_have_them_in_that_order() -> None:
    statements = Statements("t")
    order = ("now", "key", "fingerprint", "token", "lease", "ttl")
    assert statements.in_order(statements.claim, order) == statements.positional[statements.claim][0]
    with pytest.raises(RuntimeError, match="parameters are"):
        statements.in_order(statements.claim, ("key", "now", "fingerprint", "token", "lease", "ttl"))


async def test_claim_and_complete_run_outside_their_plans_on_a_free_connection(postgres_url: str, table: str) -> None:
    """The common case costs no plan: the first claim opens the pool through one; then, with a connection free, a
    claim and a completion are one statement each on it, and the plans are used only where there is none."""
    store = PostgresStore(postgres_url, table=table, min_size=1, max_size=1)
    planned: list[str] = []
    perform = store._perform

    def counting(step: Any) -> Any:
        planned.append(step.doing)
        return perform(step)

    store._perform = counting  # type: ignore[method-assign]
    try:
        await store.claim("opening", "fp", lease=10, ttl=60)  # the pool opens: through the plan
        assert planned == ["claim"]
        token = token_of(await store.claim("k", "fp", lease=10, ttl=60))
        assert await store.complete("k", token, b"done", ttl=60)
        record = (await store.claim("k", "fp", lease=10, ttl=60, token="t" * 32)).record  # type: ignore[union-attr]
        assert (record.key, record.payload) == ("k", b"done")
        assert not await store.complete("k", token, b"again", ttl=60)  # fenced there as in the plan
        assert planned == ["claim"]
        assert store._pool is not None
        held = store._pool.free_connection()  # the only connection, busy: the plan waits for it
        assert held is not None
        claiming = asyncio.ensure_future(store.claim("k2", "fp", lease=10, ttl=60))
        await eventually(lambda: planned == ["claim", "claim"], "the claim went to its plan")
        store._pool.putconn(held)
        token_of(await claiming)
    finally:
        await store.close()


# -- the pool -------------------------------------------------------------------------------------------------------


def opener(url: str, *, lifetime: float = 3600.0) -> Callable[[], Any]:
    """How the store opens a pool's connection, to *url*; counts its attempts in ``.attempts``."""
    dsn = dsn_of(url)

    async def open_one() -> Pooled:
        open_one.attempts += 1  # type: ignore[attr-defined]
        return await connect(dsn, connect_timeout=2, server_settings={}, prepare=True, lifetime=lifetime)

    open_one.attempts = 0  # type: ignore[attr-defined]
    return open_one


@pytest.fixture
async def pools() -> AsyncIterator[list[Pool]]:
    """Pools the test makes, closed at its end."""
    made: list[Pool] = []
    yield made
    for pool in made:
        await pool.close()


def new_pool(pools: list[Pool], connect_one: Callable[[], Any], **options: Any) -> Pool:
    settings = {"min_size": 1, "max_size": 2, "reconnect_timeout": 5.0, **options}
    pool = Pool(connect_one, failures=FAILURES, **settings)
    pools.append(pool)
    pool.open()
    return pool


async def test_pool_opens_min_size_in_the_background_and_gives_the_most_recent_first(
    postgres_url: str, pools: list[Pool]
) -> None:
    pool = new_pool(pools, opener(postgres_url), min_size=2, max_size=3)
    await eventually(lambda: len(pool.connections()) == 2, "two connections open")
    first, second = await pool.getconn(1), await pool.getconn(1)
    assert first is not second
    pool.putconn(first)
    pool.putconn(second)
    taken = await pool.getconn(1)
    assert taken is second  # last in, first out
    assert len(pool.connections()) == 2
    pool.putconn(taken)


async def test_pool_grows_to_max_size_then_waits_for_one_given_back(postgres_url: str, pools: list[Pool]) -> None:
    connect_one = opener(postgres_url)
    pool = new_pool(pools, connect_one, min_size=0, max_size=2)
    one, two = await asyncio.gather(pool.getconn(5), pool.getconn(5))
    assert one is not two
    waiting = asyncio.ensure_future(pool.getconn(5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    pool.putconn(one)  # to the one waiting, not to the free ones
    assert await waiting is one
    with pytest.raises(PoolTimeout, match=r"no connection within 0\.1 s"):
        await pool.getconn(0.1)
    assert connect_one.attempts == 2  # type: ignore[attr-defined]
    pool.putconn(one)
    pool.putconn(two)


async def test_a_connection_that_comes_as_its_waiter_gives_up_is_kept(postgres_url: str, pools: list[Pool]) -> None:
    pool = new_pool(pools, opener(postgres_url), min_size=1, max_size=1)
    held = await pool.getconn(5)
    waiting = asyncio.ensure_future(pool.getconn(5))
    await asyncio.sleep(0.01)
    pool.putconn(held)  # the waiter's now, and then it is cancelled before it runs
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    again = await pool.getconn(0.1)
    assert again is held
    pool.putconn(again)


async def test_pool_throws_away_closed_and_busy_connections_and_opens_others(
    postgres_url: str, pools: list[Pool]
) -> None:
    pool = new_pool(pools, opener(postgres_url), min_size=1, max_size=1)
    closed = await pool.getconn(5)
    closed.conn.terminate()
    pool.putconn(closed)
    in_transaction = await pool.getconn(5)
    assert in_transaction is not closed
    await in_transaction.conn.execute("BEGIN")
    pool.putconn(in_transaction)
    assert in_transaction.conn.is_closed()
    fresh = await pool.getconn(5)
    assert fresh not in (closed, in_transaction)
    assert await fresh.conn.fetchval("SELECT 1") == 1
    assert pool.connections() == [fresh]
    pool.putconn(fresh)


async def test_pool_closes_connections_past_their_lifetime_or_idle_too_long(
    postgres_url: str, pools: list[Pool]
) -> None:
    old = new_pool(pools, opener(postgres_url, lifetime=0.0), min_size=1, max_size=1)
    expired = await old.getconn(5)
    old.putconn(expired)  # past its lifetime: closed, and another opened
    await eventually(lambda: expired.conn.is_closed(), "the expired connection closed")
    replacement = await old.getconn(5)
    assert replacement is not expired
    old.putconn(replacement)

    idle = new_pool(pools, opener(postgres_url), min_size=1, max_size=2, max_idle=0.0)
    one, two = await asyncio.gather(idle.getconn(5), idle.getconn(5))
    idle.putconn(one)
    idle.putconn(two)  # one has been idle longer than max_idle, and the pool has more than min_size
    await eventually(lambda: one.conn.is_closed(), "the idle connection closed")
    assert idle.connections() == [two]


async def test_pool_gives_up_after_reconnect_timeout_then_tries_again_when_asked(
    postgres_url: str, pools: list[Pool]
) -> None:
    parts = urlsplit(postgres_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    try:
        await proxy.stop()  # nothing listens: every attempt is refused
        connect_one = opener(through(proxy, postgres_url))
        pool = new_pool(pools, connect_one, min_size=1, max_size=1, reconnect_timeout=1.5)
        with pytest.raises(PoolTimeout):
            await pool.getconn(0.5)
        await eventually(lambda: connect_one.attempts == 2, "a second attempt, a second later")  # type: ignore[attr-defined]
        await eventually(lambda: not pool._tasks, "the pool gave up")
        assert connect_one.attempts == 2  # type: ignore[attr-defined]  # not 2 s later again: past 1.5 s
        await proxy.start()
        pooled = await pool.getconn(5)  # a new attempt, which succeeds
        assert await pooled.conn.fetchval("SELECT 1") == 1
        pool.putconn(pooled)
    finally:
        await proxy.stop()


async def test_closing_the_pool_fails_its_waiters_and_closes_its_connections(
    postgres_url: str, pools: list[Pool]
) -> None:
    pool = new_pool(pools, opener(postgres_url), min_size=2, max_size=2)
    await eventually(lambda: len(pool.connections()) == 2, "two connections open")
    held = await pool.getconn(5)
    free = pool.connections()
    held_too = await pool.getconn(5)
    waiting = asyncio.ensure_future(pool.getconn(5))
    await asyncio.sleep(0.01)
    await pool.close()
    with pytest.raises(PoolTimeout, match="closed"):
        await waiting
    pool.putconn(held)
    pool.putconn(held_too)
    assert all(pooled.conn.is_closed() for pooled in free)
    with pytest.raises(PoolTimeout, match="closed"):
        await pool.getconn(1)


# -- a fork inside a running event loop -----------------------------------------------------------------------------

_FORKING_IN_A_LOOP = """
import asyncio, gc, os, sys
from idempo.stores import postgres

async def main(url, table):
    store = postgres.PostgresStore(url, table=table, min_size=1, max_size=1, statement_timeout=1)
    await store.claim("before", "fp", lease=30, ttl=60)
    before = [pooled.conn.get_server_pid() for pooled in store._pool.connections()]
    pid = os.fork()
    if pid == 0:  # the child: whatever collects the connections it inherited (here, the collector)
        postgres._INHERITED_POOLS.clear()
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    for n in range(5):
        await store.claim(f"after-{n}", "fp", lease=30, ttl=60)
    after = [pooled.conn.get_server_pid() for pooled in store._pool.connections()]
    print("same connection" if after == before else f"replaced: {before} -> {after}", flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_child_forked_in_a_running_loop_leaves_the_parents_connections_alone(postgres_url: str, table: str) -> None:
    """The child shares the event loop's epoll set with its parent: had asyncpg closed the connections the child
    inherited, their sockets would be gone from the parent's loop, which would no longer hear its answers (until the
    store's deadline threw the connection away)."""
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_IN_A_LOOP, postgres_url, table],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "same connection\n"), result.stderr


# -- the store on its pool ------------------------------------------------------------------------------------------


async def test_a_store_cancelled_while_waiting_for_a_connection_leaves_the_pool_whole(
    postgres_url: str, table: str
) -> None:
    store = PostgresStore(postgres_url, table=table, min_size=1, max_size=1, pool_timeout=5)
    try:
        token = token_of(await store.claim("k", "fp", lease=60, ttl=60))
        assert store._pool is not None
        held = store._pool.free_connection()  # the store's only connection, taken
        assert held is not None
        waiting = asyncio.ensure_future(store.get("k"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        store._pool.putconn(held)
        assert await store.complete("k", token, b"done", ttl=60)
        assert store._pool.connections() == [held]
    finally:
        await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get("k")
