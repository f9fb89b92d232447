"""``idempo keys``: list, show, delete and purge the records of a real store (SQLite, Redis, PostgreSQL), written
by the real middleware, decorator and store; through click's CliRunner, and as the installed ``idempo`` script."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from click.testing import CliRunner, Result
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import Acquired, IdempotencyMiddleware, idempotent
from idempo._cli import keys as keys_module
from idempo._cli._app import cli
from idempo._core.fingerprint import principal_digest
from idempo.stores import SyncScanningStore, SyncStore, store_from_url, sync_store_from_url
from idempo.stores.postgres import PostgresStore
from idempo.stores.sqlite import SQLiteStore, SyncSQLiteStore

from .redis_cluster import free_port

ALICE, BOB = principal_digest(b"Bearer alice"), principal_digest(b"Bearer bob")
BINARY = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"


@dataclass(frozen=True)
class Populated:
    """A store with records in it; *url* opens it."""

    url: str
    kind: str  # "sqlite", "redis" (a server or a cluster) or "postgres"


async def _charge(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({"id": f"ch_{body['amount']}", "amount": body["amount"]}, 201, {"x-charge-id": "ch_1"})


async def _picture(request: Request) -> Response:
    return Response(BINARY, 200, media_type="image/png")


async def _populate(url: str) -> None:
    """Through the middleware: alice and bob both use the key ``order-1``; alice also ``order-2`` and ``pic-1``
    (a binary body); an in-progress claim ``pending`` of alice's, taken on the store itself."""
    store = store_from_url(url)
    app = IdempotencyMiddleware(
        Starlette(routes=[Route("/charges", _charge, methods=["POST"]), Route("/pic", _picture, methods=["POST"])]),
        store=store,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        for user, key, path, amount in [
            ("alice", "order-1", "/charges", 100),
            ("bob", "order-1", "/charges", 200),
            ("alice", "order-2", "/charges", 300),
            ("alice", "pic-1", "/pic", 0),
        ]:
            headers = {"Authorization": f"Bearer {user}", "Idempotency-Key": key}
            response = await client.post(path, json={"amount": amount}, headers=headers)
            assert response.status_code in (200, 201), response.text
    await store.claim(f"{ALICE}:pending", "f" * 64, lease=600, ttl=3600)
    await store.close()


def _populate_function(url: str) -> None:
    """Through the decorator on a sync function: the record ``fn:jobs.charge:7``."""
    store = sync_store_from_url(url)

    @idempotent(store, key="{n}", namespace="jobs.charge")
    def charge(n: int) -> dict[str, int]:
        return {"charged": n}

    assert charge(7) == {"charged": 7}
    store.close()


def _expired(store: SQLiteStore | PostgresStore) -> None:
    """Two records written on a clock 1000 s behind: long expired, until purged."""

    async def write() -> None:
        for key in ("old-1", "old-2"):
            await store.claim(f"{ALICE}:{key}", "f" * 64, lease=10, ttl=10)
        await store.close()

    asyncio.run(write())


@pytest.fixture(params=["sqlite", "redis", "redis-cluster", "postgres"])
def populated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Populated]:
    """Each kind of store, populated; Redis under a prefix of its own, PostgreSQL in a table of its own."""
    kind: str = request.param
    table = f"idempo_cli_{uuid.uuid4().hex[:12]}"
    past = lambda: time.time() - 1000  # noqa: E731
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'cli.db'}"
        _expired(SQLiteStore(tmp_path / "cli.db", clock=past))
    elif kind in ("redis", "redis-cluster"):
        base: str = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
        url = f"{base}{'?' if '?' not in base else '&'}prefix=idempo-test-cli-{uuid.uuid4().hex[:12]}:"
        kind = "redis"
    else:
        base = request.getfixturevalue("postgres_url")
        url = f"{base}?table={table}"
        _expired(PostgresStore(base, table=table, clock=past))
    asyncio.run(_populate(url))
    _populate_function(url)
    yield Populated(url, kind)
    if kind == "redis":
        store = sync_store_from_url(url)
        assert isinstance(store, SyncScanningStore)
        for record in store.scan():
            store.delete(record.key)
        store.close()
    elif kind == "postgres":
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table)))


def keys(*args: str, store: str | None = None, input: str | None = None) -> Result:
    argv = ["keys", *args] + (["--store", store] if store is not None else [])
    return CliRunner().invoke(cli, argv, input=input, catch_exceptions=False)


# -- list ----------------------------------------------------------------------------------------------------------


def test_list_shows_every_live_record(populated: Populated) -> None:
    result = keys("list", store=populated.url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["KEY", "PRINCIPAL", "STATE", "STATUS", "AGE", "EXPIRES", "IN"]
    rows = {(line.split()[0], line.split()[1]): line.split()[2:4] for line in lines[1:]}
    assert rows == {
        ("order-1", ALICE[:8]): ["completed", "201"],
        ("order-1", BOB[:8]): ["completed", "201"],
        ("order-2", ALICE[:8]): ["completed", "201"],
        ("pic-1", ALICE[:8]): ["completed", "200"],
        ("pending", ALICE[:8]): ["in", "progress"],  # then "-" for its status
        ("7", "fn:jobs.charge"): ["completed", "fn"],
    }  # and no expired record (old-1, old-2)
    pending = next(line for line in lines if line.startswith("pending"))
    assert pending.split()[4] == "-"
    assert "23h59m" in pending or "1h00m" in pending or "59m" in pending  # expires in about an hour


def test_list_as_json(populated: Populated) -> None:
    result = keys("list", "--json", store=populated.url)
    assert result.exit_code == 0, result.output
    listed = {item["store_key"]: item for item in json.loads(result.output)}
    assert set(listed) == {
        f"{ALICE}:order-1", f"{BOB}:order-1", f"{ALICE}:order-2", f"{ALICE}:pic-1", f"{ALICE}:pending",
        "fn:jobs.charge:7",
    }  # fmt: skip
    order = listed[f"{BOB}:order-1"]
    assert (order["kind"], order["key"], order["principal"], order["state"], order["status"]) == (
        "http", "order-1", BOB, "completed", 201,
    )  # fmt: skip
    assert 0 <= order["age_seconds"] < 600
    assert 86_000 < order["expires_in_seconds"] <= 86_400
    pending = listed[f"{ALICE}:pending"]
    assert (pending["state"], pending["status"], pending["stale"], pending["payload_bytes"]) == (
        "in_progress", None, False, None,
    )  # fmt: skip
    function = listed["fn:jobs.charge:7"]
    assert (function["kind"], function["namespace"], function["key"], function["status"]) == (
        "fn", "jobs.charge", "7", None,
    )  # fmt: skip


def test_list_filters(populated: Populated) -> None:
    def listed(*args: str) -> list[str]:
        result = keys("list", "--json", *args, store=populated.url)
        assert result.exit_code == 0, result.output
        return sorted(item["store_key"] for item in json.loads(result.output))

    assert listed("--prefix", f"{BOB}:") == [f"{BOB}:order-1"]
    assert listed("--prefix", "fn:") == ["fn:jobs.charge:7"]
    assert listed("--prefix", "nothing-has-this") == []
    assert listed("--principal", ALICE, "--prefix", "order-") == [f"{ALICE}:order-1", f"{ALICE}:order-2"]
    assert listed("--principal", ALICE[:6], "--prefix", "p") == [f"{ALICE}:pending", f"{ALICE}:pic-1"]
    assert len(listed("--limit", "2")) == 2
    assert len(listed("--principal", ALICE[:6], "--limit", "3")) == 3
    assert listed("--limit", "0") == []


# -- show ----------------------------------------------------------------------------------------------------------


def test_show_a_completed_record_without_its_body(populated: Populated) -> None:
    result = keys("show", f"{ALICE}:order-1", store=populated.url)
    assert result.exit_code == 0, result.output
    assert f"principal:    {ALICE}" in result.output
    assert "state:        completed" in result.output
    assert "status:       201" in result.output
    assert "  x-charge-id: ch_1" in result.output
    assert "  content-type: application/json" in result.output
    assert "ch_100" not in result.output  # the body is never printed unless asked
    assert "(--body to print it)" in result.output


def test_show_the_body(populated: Populated) -> None:
    result = keys("show", "order-1", "--principal", ALICE, "--body", store=populated.url)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith('{"id":"ch_100","amount":100}')
    picture = keys("show", "pic-1", "--body", store=populated.url)
    assert picture.exit_code == 0, picture.output
    assert f"body:         {len(BINARY)} bytes, binary, in base64:\niVBORw0KGgoA//4=\n" in picture.output
    shown = json.loads(keys("show", "pic-1", "--body", "--json", store=populated.url).output)
    assert (shown["status"], shown["body"], shown["body_base64"]) == (200, None, "iVBORw0KGgoA//4=")
    assert ["content-type", "image/png"] in shown["headers"]


def test_show_a_bare_key_that_several_principals_used(populated: Populated) -> None:
    result = keys("show", "order-1", store=populated.url)
    assert result.exit_code == 1
    assert "2 records have the key 'order-1'" in result.output
    assert ALICE[:8] in result.output
    assert BOB[:8] in result.output
    assert "--principal" in result.output
    result = keys("show", "order-1", "--principal", BOB[:10], store=populated.url)
    assert result.exit_code == 0, result.output
    assert f"principal:    {BOB}" in result.output


def test_show_asks_a_person_at_a_terminal_to_choose(populated: Populated, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_module, "_interactive", lambda: True)
    result = keys("show", "order-1", "--body", store=populated.url, input="2\n")
    assert result.exit_code == 0, result.output
    assert "Which one?" in result.output
    second = next(line for line in result.output.splitlines() if line.startswith("  2  "))
    chosen, amount = (BOB, 200) if BOB[:8] in second else (ALICE, 100)
    assert f"principal:    {chosen}" in result.output
    assert result.output.rstrip().endswith(f'{{"id":"ch_{amount}","amount":{amount}}}')


def test_show_an_in_progress_record_and_a_function_result(populated: Populated) -> None:
    pending = keys("show", "pending", store=populated.url)
    assert pending.exit_code == 0, pending.output
    assert "state:        in progress, lease ends in" in pending.output
    assert "status:" not in pending.output
    function = keys("show", "fn:jobs.charge:7", "--body", store=populated.url)
    assert function.exit_code == 0, function.output
    assert "function:     jobs.charge" in function.output
    assert "status:" not in function.output
    assert json.loads(function.output.rstrip().splitlines()[-1]) == {"charged": 7}
    assert keys("show", "7", store=populated.url).exit_code == 0  # a bare key finds the decorator's too


def test_show_an_unknown_key(populated: Populated) -> None:
    for args in (["no-such-key"], ["order-1", "--principal", "0" * 32], ["order-1", "--principal", "0123"]):
        result = keys("show", *args, store=populated.url)
        assert result.exit_code == 1, args
        assert "Error: no record under key" in result.output


async def test_a_response_too_large_to_keep_and_a_payload_of_another_kind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    store = store_from_url(url)
    app = IdempotencyMiddleware(
        Starlette(routes=[Route("/charges", _charge, methods=["POST"])]), store=store, max_response_bytes=10
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        response = await client.post("/charges", json={"amount": 1}, headers={"Idempotency-Key": "big"})
        assert response.status_code == 201
    claim = await store.claim("someone-else's", "f" * 64, lease=60, ttl=600)
    assert isinstance(claim, Acquired)
    assert await store.complete("someone-else's", claim.token, b"\xffnot a response", ttl=600)
    await store.close()
    table = keys("list", store=url).output.splitlines()
    assert table[1].split()[:4] == ["big", principal_digest(b"")[:8], "completed", "201*"]
    assert table[2].split()[:4] == ["someone-else's", "-", "completed", "?"]
    big = keys("show", "big", "--body", store=url)
    assert big.exit_code == 0, big.output
    assert "status:       201\nbody:         not kept (the response was too large to store)" in big.output
    assert big.output.endswith("not a replay\n")  # and no body after it
    odd = keys("show", "someone-else's", "--body", "--json", store=url)
    shown = json.loads(odd.output)
    assert (shown["kind"], shown["status"], shown["body_base64"]) == ("other", None, "/25vdCBhIHJlc3BvbnNl")
    text = keys("show", "someone-else's", store=url).output
    assert "payload:      not a stored response (unknown stored response format b'\\xff'); 15 bytes" in text


# -- delete and purge ----------------------------------------------------------------------------------------------


def test_delete_asks_first(populated: Populated) -> None:
    refused = keys("delete", "order-2", store=populated.url, input="n\n")
    assert refused.exit_code == 1
    assert "Aborted" in refused.output
    assert keys("show", "order-2", store=populated.url).exit_code == 0
    confirmed = keys("delete", "order-2", store=populated.url, input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert f"deleted {ALICE}:order-2" in confirmed.output
    assert keys("show", "order-2", store=populated.url).exit_code == 1
    forced = keys("delete", f"{BOB}:order-1", "--yes", store=populated.url)
    assert forced.exit_code == 0, forced.output
    remaining = json.loads(keys("list", "--json", "--prefix", ALICE[:4], store=populated.url).output)
    assert f"{ALICE}:order-1" in [item["store_key"] for item in remaining]
    assert keys("delete", "order-2", "--yes", store=populated.url).exit_code == 1  # gone already


def test_purge(populated: Populated) -> None:
    result = keys("purge", store=populated.url)
    assert result.exit_code == 0, result.output
    # Two records written on a clock 1000 s behind expired long ago; Redis drops them on its own.
    expected = 0 if populated.kind == "redis" else 2
    assert f"purged {expected} expired records" in result.output
    assert "purged 0 expired records" in keys("purge", store=populated.url).output
    assert len(json.loads(keys("list", "--json", store=populated.url).output)) == 6  # live ones stay


# -- errors ----------------------------------------------------------------------------------------------------------


def test_usage_errors_exit_with_2(tmp_path: Path) -> None:
    missing = keys("list")
    assert missing.exit_code == 2
    assert "Missing option '--store'" in missing.output
    for url in ("nosuch://x", "redis://h?no_such_option=1", "sqlite://"):
        result = keys("list", store=url)
        assert result.exit_code == 2, url
        assert "Invalid value for '--store'" in result.output
        assert "Traceback" not in result.output
    url = _empty_sqlite(tmp_path / "x.db")
    assert keys("list", "--limit", "-1", store=url).exit_code == 2
    for command in ("show", "delete"):
        result = keys(command, "k", "--principal", "xyz", store=url)
        assert result.exit_code == 2
        assert "Invalid value for '--principal'" in result.output
    assert keys("list", "--principal", "xyz", store=url).exit_code == 2


def _empty_sqlite(path: Path) -> str:
    store = SyncSQLiteStore(path)
    assert store.purge_expired() == 0  # creates the file and its table
    store.close()
    return f"sqlite:///{path}"


def test_the_store_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMPO_STORE", _empty_sqlite(tmp_path / "env.db"))
    result = keys("list")
    assert result.exit_code == 0, result.output
    assert "no records" in result.output


def test_a_sqlite_file_that_is_not_there_is_not_created(tmp_path: Path) -> None:
    result = keys("list", store=f"sqlite:///{tmp_path / 'typo.db'}")
    assert result.exit_code == 2
    assert f"no SQLite database at '{tmp_path / 'typo.db'}'" in result.output
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:{port}/0?timeout=1&connect_timeout=1", "postgresql://postgres@127.0.0.1:{port}/test"],
)
def test_an_unreachable_store_is_one_line(url: str) -> None:
    result = keys("list", store=url.format(port=free_port()))
    assert result.exit_code == 1
    assert result.output.startswith(("Error: Redis store ", "Error: PostgreSQL store "))
    assert "failed" in result.output
    assert len(result.output.splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    result = keys("list", store="redis://127.0.0.1:6379/0")
    assert result.exit_code == 1
    assert "pip install 'idempo[redis]'" in result.output


class _NoScan:
    """A sync store of a user's own, without scan."""

    def __init__(self) -> None:
        self.inner = sync_store_from_url("memory://")
        self.get = self.inner.get
        self.delete = self.inner.delete
        self.purge_expired = self.inner.purge_expired
        self.close = self.inner.close


def test_a_store_without_scan_cannot_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_module, "sync_store_from_url", lambda url: _NoScan())
    result = keys("list", store="mine://")
    assert result.exit_code == 1
    assert "_NoScan cannot list its records (it has no scan())" in result.output
    assert keys("show", "k", store="mine://").exit_code == 1  # a bare key needs a scan
    assert "purged 0" in keys("purge", store="mine://").output  # what needs no scan works


def test_help_everywhere() -> None:
    for args in (["keys"], ["keys", "list"], ["keys", "show"], ["keys", "delete"], ["keys", "purge"]):
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "Usage: " in result.output
    assert "IDEMPO_STORE" in CliRunner().invoke(cli, ["keys", "list", "--help"]).output


# -- the installed script --------------------------------------------------------------------------------------------


def test_the_idempo_script(tmp_path: Path) -> None:
    """``idempo keys`` as a user runs it: a process of its own, on a SQLite file the middleware wrote."""
    script = Path(sys.executable).parent / "idempo"
    url = f"sqlite:///{tmp_path / 'script.db'}"
    asyncio.run(_populate(url))
    env = {**os.environ, "IDEMPO_STORE": url, "COLUMNS": "200"}
    listed = subprocess.run(
        [script, "keys", "list", "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert sorted(item["key"] for item in json.loads(listed.stdout)) == [
        "order-1", "order-1", "order-2", "pending", "pic-1",
    ]  # fmt: skip
    deleted = subprocess.run(
        [script, "keys", "delete", "pending", "--yes"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert (deleted.returncode, deleted.stdout.strip()) == (0, f"deleted {ALICE}:pending")
    bad = subprocess.run(
        [script, "keys", "list", "--store", "nosuch://"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2
    assert "unknown store scheme" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_sync_stores_built_in_can_scan(tmp_path: Path) -> None:
    store: SyncStore = sync_store_from_url(f"sqlite:///{tmp_path / 's.db'}")
    assert isinstance(store, SyncScanningStore)
    store.close()
