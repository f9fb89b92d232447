"""``idempo keys``: list, show, delete, resolve and purge the records of a real store (SQLite, Redis, PostgreSQL),
written by the real middleware, decorator and store; through click's CliRunner, and as the installed ``idempo``
script. Whatever comes from the store reaches the terminal with its control characters escaped."""

from __future__ import annotations

import asyncio
import json
import os
import re
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
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idempo import (
    Acquired,
    Claim,
    IdempotencyMiddleware,
    OutcomeUnknownError,
    authorization_principal,
    idempotent,
    mark_outcome_unknown,
)
from idempo._cli import keys as keys_module
from idempo._cli import records as records_module
from idempo._cli._app import cli
from idempo._core.codec import encode_response
from idempo._core.errors import StoreError
from idempo._core.fingerprint import principal_digest
from idempo.stores import SyncScanningStore, SyncStore, store_from_url, sync_store_from_url
from idempo.stores.postgres import PostgresStore
from idempo.stores.sqlite import SQLiteStore, SyncSQLiteStore
from tests.support.redis_cluster import free_port


def _digest(authorization: bytes) -> str:
    """The principal digest the middleware files a caller's records under, by the middleware's own rule."""
    return principal_digest(authorization_principal({"type": "http", "headers": [(b"authorization", authorization)]}))


ALICE, BOB = _digest(b"Bearer alice"), _digest(b"Bearer bob")
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


def keys(*args: str, store: str | None = None, input: str | None = None, color: bool = False) -> Result:
    """Run ``idempo keys``. With *color*, click keeps escape sequences in what it prints, as it does at a terminal
    (to anything else it strips the ANSI ones on its own)."""
    argv = ["keys", *args] + (["--store", store] if store is not None else [])
    return CliRunner().invoke(cli, argv, input=input, catch_exceptions=False, color=color)


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


async def test_the_anonymous_principal_is_labelled_and_can_be_chosen(populated: Populated) -> None:
    """A request with no Authorization header (and no user), through the real middleware: its record is filed under
    the digest of nothing, which the table labels '(anonymous)', the JSON says with "anonymous": true, show says in
    words, and --principal anonymous chooses."""
    store = store_from_url(populated.url)
    app = IdempotencyMiddleware(Starlette(routes=[Route("/charges", _charge, methods=["POST"])]), store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        response = await client.post("/charges", json={"amount": 5}, headers={"Idempotency-Key": "order-1"})
        assert response.status_code == 201
    await store.close()
    anonymous = principal_digest(b"")
    assert anonymous.startswith("e3b0c442")

    table = keys("list", store=populated.url)
    assert table.exit_code == 0, table.output
    rows = {tuple(line.split()[:2]) for line in table.output.splitlines()[1:]}
    assert {("order-1", "(anonymous)"), ("order-1", ALICE[:8]), ("order-1", BOB[:8])} <= rows
    assert "e3b0c442" not in table.output

    listed = {item["store_key"]: item for item in json.loads(keys("list", "--json", store=populated.url).output)}
    assert (listed[f"{anonymous}:order-1"]["principal"], listed[f"{anonymous}:order-1"]["anonymous"]) == (
        anonymous, True,
    )  # fmt: skip
    assert listed[f"{ALICE}:order-1"]["anonymous"] is False
    assert listed["fn:jobs.charge:7"]["anonymous"] is False

    for chosen in ("anonymous", "(anonymous)", "ANONYMOUS", anonymous[:4]):
        only = keys("list", "--json", "--principal", chosen, store=populated.url)
        assert only.exit_code == 0, only.output
        assert [item["store_key"] for item in json.loads(only.output)] == [f"{anonymous}:order-1"], chosen

    shown = keys("show", "order-1", "--principal", "anonymous", store=populated.url)
    assert shown.exit_code == 0, shown.output
    assert f"principal:    {anonymous} (anonymous: no user, no Authorization header)\n" in shown.output
    assert json.loads(keys("show", "order-1", "--principal", "anonymous", "--json", store=populated.url).output)[
        "anonymous"
    ]
    alice = keys("show", "order-1", "--principal", ALICE, store=populated.url)
    assert f"principal:    {ALICE}\n" in alice.output


def test_list_help_explains_the_principal_column() -> None:
    result = keys("list", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "PRINCIPAL is whose record it is: the first 8 characters of a digest (SHA-256) of the caller" in text
    assert 'the authenticated user an auth middleware set (scope["user"]), else the Authorization header' in text
    assert (
        "'(anonymous)' marks the requests that had neither: they all share one namespace (digest e3b0c442...)" in text
    )
    assert "--principal takes a digest's first characters, or 'anonymous'" in text


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
    table = [re.split(r"\s{2,}", line) for line in keys("list", store=url).output.splitlines()]
    assert table[1][:4] == ["big", "(anonymous)", "completed, response not stored (too_large)", "201*"]
    assert table[2][:4] == ["someone-else's", "-", "completed", "?"]
    big = keys("show", "big", "--body", store=url)
    assert big.exit_code == 0, big.output
    assert "status:       201\nbody:         not kept (too_large); retries get a 410 response-not-stored" in big.output
    assert big.output.endswith("not a replay\n")  # and no body after it
    odd = keys("show", "someone-else's", "--body", "--json", store=url)
    shown = json.loads(odd.output)
    assert (shown["kind"], shown["status"], shown["body_base64"]) == ("other", None, "/25vdCBhIHJlc3BvbnNl")
    text = keys("show", "someone-else's", store=url).output
    assert "payload:      not a stored response (unknown stored response format b'\\xff'); 15 bytes" in text


# -- outcome unknown, and resolving it ------------------------------------------------------------------------------


class Uncertain:
    """Payments behind the real middleware, on the store *url*, whose provider call may time out after the charge was
    sent. ``/pay`` raises ``OutcomeUnknownError`` (the middleware answers 503) while ``self.provider_down``; ``/gw``
    calls ``mark_outcome_unknown()`` and answers 504, as a gateway does; ``/big`` answers more than the middleware
    keeps. ``self.runs`` counts the charges each path made."""

    def __init__(self, url: str) -> None:
        self.runs = {"/pay": 0, "/gw": 0, "/big": 0}
        self.provider_down = True
        self.store = store_from_url(url)
        routes = [Route(path, self.handle, methods=["POST"]) for path in self.runs]
        # Inside Starlette's error handling, as add_middleware puts it: the middleware sees OutcomeUnknownError.
        middleware = [Middleware(IdempotencyMiddleware, store=self.store, max_response_bytes=256)]
        self.app = Starlette(routes=routes, middleware=middleware)

    async def handle(self, request: Request) -> Response:
        self.runs[request.url.path] += 1
        if request.url.path == "/big":
            return JSONResponse({"receipt": "x" * 1000}, 201)
        if not self.provider_down:
            return JSONResponse({"id": "ch_1"}, 201)
        if request.url.path == "/pay":
            raise OutcomeUnknownError("the payment provider did not answer in time")
        mark_outcome_unknown()
        return JSONResponse({"detail": "the provider did not answer in time"}, 504)

    async def post(self, path: str, key: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://test") as client:
            return await client.post(
                path, json={"amount": 1}, headers={"Authorization": "Bearer alice", "Idempotency-Key": key}
            )

    async def populate(self) -> None:
        """alice's ``pay-1`` (outcome unknown, first answered 503), ``pay-2`` (first answered 504), ``big-1``
        (completed, its response not stored: too large)."""
        assert (await self.post("/pay", "pay-1")).status_code == 503
        assert (await self.post("/gw", "pay-2")).status_code == 504
        assert (await self.post("/big", "big-1")).status_code == 201


async def test_list_and_show_the_states_of_unknown_outcomes_and_responses_not_stored(populated: Populated) -> None:
    uncertain = Uncertain(populated.url)
    await uncertain.populate()
    await uncertain.store.close()
    table = keys("list", "--principal", ALICE, store=populated.url)
    assert table.exit_code == 0, table.output
    rows = {cells[0]: cells[2:4] for cells in (re.split(r"\s{2,}", line) for line in table.output.splitlines()[1:])}
    assert rows["pay-1"] == ["outcome unknown (first answered 503)", "-"]
    assert rows["pay-2"] == ["outcome unknown (first answered 504)", "-"]
    assert rows["big-1"] == ["completed, response not stored (too_large)", "201*"]
    assert rows["order-1"] == ["completed", "201"]

    listed = {
        item["key"]: item
        for item in json.loads(keys("list", "--json", "--principal", ALICE, store=populated.url).output)
    }
    unknown, big, done = listed["pay-2"], listed["big-1"], listed["order-1"]
    assert (unknown["state"], unknown["state_text"], unknown["status"], unknown["first_status"]) == (
        "outcome_unknown", "outcome unknown (first answered 504)", None, 504,
    )  # fmt: skip
    assert unknown["not_stored_reason"] is None
    assert (big["state"], big["state_text"], big["status"], big["not_stored_reason"], big["first_status"]) == (
        "completed", "completed, response not stored (too_large)", 201, "too_large", None,
    )  # fmt: skip
    assert (done["state"], done["state_text"], done["not_stored_reason"]) == ("completed", "completed", None)

    shown = keys("show", "pay-2", "--body", store=populated.url)
    assert shown.exit_code == 0, shown.output
    assert "state:        outcome unknown (first answered 504)\n" in shown.output
    assert "retries get:  503 outcome-unknown, nothing runs, until the record expires or is resolved" in shown.output
    assert "status:" not in shown.output
    as_json = json.loads(keys("show", "pay-1", "--json", store=populated.url).output)
    assert (as_json["state"], as_json["first_status"], as_json["too_large"]) == ("outcome_unknown", 503, False)


async def test_resolve_ran_makes_every_retry_a_410_and_nothing_runs_again(populated: Populated) -> None:
    uncertain = Uncertain(populated.url)
    await uncertain.populate()
    before = sync_store_from_url(populated.url)
    original = before.get(f"{ALICE}:pay-2")
    before.close()
    assert original is not None

    result = keys("resolve", "pay-2", "--principal", ALICE, "--ran", "--status", "201", "--yes", store=populated.url)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"resolved {ALICE}:pay-2: ran; retries get 410 response-not-stored until ")

    uncertain.provider_down = False  # would the operation run again, it would succeed: it must not run
    for _ in range(2):
        retry = await uncertain.post("/gw", "pay-2")
        assert retry.status_code == 410, retry.text
        document = retry.json()
        assert document["type"].endswith("response-not-stored")
        assert (document["original_status"], document["reason"]) == (201, "operator")
    assert uncertain.runs["/gw"] == 1
    await uncertain.store.close()

    shown = json.loads(keys("show", "pay-2", "--json", store=populated.url).output)
    assert (shown["state"], shown["state_text"], shown["status"]) == (
        "completed", "completed, response not stored (operator)", 201,
    )  # fmt: skip
    assert shown["expires_at"] == pytest.approx(original.expires_at, abs=5)  # the record's expiry is kept
    assert shown["fingerprint"] == original.fingerprint

    again = keys("resolve", "pay-2", "--ran", "--yes", store=populated.url)
    assert again.exit_code == 1  # no longer of unknown outcome
    assert "is completed, response not stored (operator), not of unknown outcome; --force" in again.output


async def test_resolve_ran_with_a_ttl(populated: Populated) -> None:
    uncertain = Uncertain(populated.url)
    await uncertain.populate()
    await uncertain.store.close()
    result = keys("resolve", "pay-1", "--ran", "--ttl", "90", "-y", store=populated.url)
    assert result.exit_code == 0, result.output
    shown = json.loads(keys("show", "pay-1", "--json", store=populated.url).output)
    assert (shown["status"], shown["not_stored_reason"]) == (200, "operator")  # --status defaults to 200
    assert 80 < shown["expires_in_seconds"] <= 90


async def test_resolve_not_run_deletes_the_record_and_the_next_retry_runs(populated: Populated) -> None:
    uncertain = Uncertain(populated.url)
    await uncertain.populate()
    refused = keys("resolve", "pay-1", "--not-run", store=populated.url, input="n\n")
    assert refused.exit_code == 1
    assert "Resolve" in refused.output
    assert "Aborted" in refused.output
    assert (await uncertain.post("/pay", "pay-1")).status_code == 503  # still unknown: nothing was changed

    result = keys("resolve", "pay-1", "--not-run", store=populated.url, input="y\n")
    assert result.exit_code == 0, result.output
    assert f"resolved {ALICE}:pay-1: not run; the record is deleted" in result.output
    assert keys("show", "pay-1", store=populated.url).exit_code == 1

    uncertain.provider_down = False
    retry = await uncertain.post("/pay", "pay-1")
    assert (retry.status_code, retry.json()) == (201, {"id": "ch_1"})
    assert uncertain.runs["/pay"] == 2  # it did not happen the first time, so it ran now
    assert (await uncertain.post("/pay", "pay-1")).headers["idempotent-replayed"] == "true"
    assert uncertain.runs["/pay"] == 2
    await uncertain.store.close()


def test_resolve_refuses_what_is_not_of_unknown_outcome_unless_forced(populated: Populated) -> None:
    for key, state in ((f"{ALICE}:order-2", "completed"), (f"{ALICE}:pending", "in progress")):
        for verdict in ("--ran", "--not-run"):
            result = keys("resolve", key, verdict, "--yes", store=populated.url)
            assert result.exit_code == 1, result.output
            assert (
                result.output
                == f"Error: {key!r} is {state}, not of unknown outcome; --force resolves it all the same\n"
            )
    assert json.loads(keys("show", "order-2", "--json", store=populated.url).output)["status"] == 201  # untouched
    forced = keys("resolve", "order-2", "--ran", "--status", "202", "--force", "--yes", store=populated.url)
    assert forced.exit_code == 0, forced.output
    shown = json.loads(keys("show", "order-2", "--json", store=populated.url).output)
    assert (shown["status"], shown["not_stored_reason"]) == (202, "operator")
    deleted = keys("resolve", "pending", "--not-run", "--force", "--yes", store=populated.url)
    assert deleted.exit_code == 0, deleted.output
    assert keys("show", "pending", store=populated.url).exit_code == 1


def test_resolve_usage_errors(tmp_path: Path) -> None:
    url = _empty_sqlite(tmp_path / "u.db")
    for args in ([], ["--ran", "--not-run"], ["--not-run", "--status", "200"], ["--not-run", "--ttl", "5"]):
        result = keys("resolve", "k", *args, store=url)
        assert result.exit_code == 2, args
        assert "Traceback" not in result.output
    assert "exactly one of --ran" in keys("resolve", "k", store=url).output
    for args in (["--ran", "--status", "99"], ["--ran", "--ttl", "0"]):
        assert keys("resolve", "k", *args, store=url).exit_code == 2, args
    missing = keys("resolve", "k", "--ran", "--yes", store=url)
    assert (missing.exit_code, missing.output) == (1, "Error: no record under key 'k'\n")


class _RacedStore:
    """A real sync store in which a request claims the key right after ``resolve`` deletes it: the one round trip
    in which ``resolve --ran`` cannot keep the key."""

    def __init__(self, url: str) -> None:
        inner = sync_store_from_url(url)
        assert isinstance(inner, SyncScanningStore)
        self.inner = inner
        self.raced: list[Claim] = []
        self.get, self.claim, self.scan, self.close = inner.get, inner.claim, inner.scan, inner.close

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return self.inner.complete(key, token, payload, ttl=ttl)

    def delete(self, key: str) -> bool:
        deleted = self.inner.delete(key)
        self.raced.append(self.inner.claim(key, "f" * 64, lease=60, ttl=600))
        return deleted


async def test_resolve_ran_says_so_when_a_request_takes_the_key_in_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    uncertain = Uncertain(url)
    await uncertain.populate()
    await uncertain.store.close()
    raced: list[_RacedStore] = []

    def open_raced(store_url: str) -> _RacedStore:
        raced.append(_RacedStore(store_url))
        return raced[-1]

    monkeypatch.setattr(keys_module, "sync_store_from_url", open_raced)
    result = keys("resolve", f"{ALICE}:pay-2", "--ran", "--yes", store=url)
    assert result.exit_code == 1
    assert "arrived between this command's delete and its claim, and took the key (now in progress)" in result.output
    assert "nothing was written" in result.output
    assert isinstance(raced[0].raced[0], Acquired)
    monkeypatch.undo()
    shown = json.loads(keys("show", "pay-2", "--json", store=url).output)
    assert (shown["state"], shown["fingerprint"]) == ("in_progress", "f" * 64)  # the request's claim, untouched


class _CompleteFails(_RacedStore):
    """A real sync store whose ``complete`` fails, as a store that goes away between two round trips does."""

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        raise StoreError("SQLite store 'race.db': complete failed: OperationalError: disk I/O error")


async def test_resolve_ran_says_where_it_left_a_key_whose_complete_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    uncertain = Uncertain(url)
    await uncertain.populate()
    monkeypatch.setattr(keys_module, "sync_store_from_url", _CompleteFails)
    result = keys("resolve", f"{ALICE}:pay-2", "--ran", "--yes", store=url)
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: SQLite store 'race.db': complete failed: OperationalError: disk I/O error: "
    )
    assert "is claimed (in progress) for 60 s but not resolved; run this command again with --force" in result.output
    monkeypatch.undo()
    retry = await uncertain.post("/gw", "pay-2")
    assert retry.status_code == 409  # held: not run again meanwhile
    assert uncertain.runs["/gw"] == 1
    forced = keys("resolve", f"{ALICE}:pay-2", "--ran", "--force", "--yes", store=url)
    assert forced.exit_code == 0, forced.output
    assert (await uncertain.post("/gw", "pay-2")).status_code == 410
    assert uncertain.runs["/gw"] == 1
    await uncertain.store.close()


# -- escaping what the store holds ----------------------------------------------------------------------------------

_HOSTILE_KEY = "evil\x1b]0;owned\x07\u202egnp.exe"
_HOSTILE_BODY = "hello\x1b[2J\x1b[31mred\x9b31m\u202eevil\x7f\r\n\tindented\n".encode()
# Everything a terminal could act on, as records.safe escapes it; in a body shown as text, \n and \t stay.
_RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _write_hostile(url: str) -> None:
    """A response whose key, header value and body carry terminal escapes, and a decorator's record whose key does:
    written on the store itself, as any code sharing the store could (the middleware refuses such keys)."""
    store = sync_store_from_url(url)
    response = encode_response(
        200, [(b"content-type", b"text/plain"), (b"x-note", b"\x1b[8mhidden\x9b\xff")], _HOSTILE_BODY
    )
    for key, payload in ((f"{ALICE}:{_HOSTILE_KEY}", response), ("fn:ns\u202e:k\x1b[5m", b"\x04" + b'"x"')):
        claim = store.claim(key, "f" * 64, lease=60, ttl=600)
        assert isinstance(claim, Acquired)
        assert store.complete(key, claim.token, payload, ttl=600)
    store.close()


def test_nothing_from_the_store_reaches_the_terminal_raw(populated: Populated) -> None:
    _write_hostile(populated.url)
    outputs = {
        "list": keys("list", store=populated.url, color=True),
        "show": keys("show", f"{ALICE}:{_HOSTILE_KEY}", store=populated.url, color=True),
        "body": keys("show", f"{ALICE}:{_HOSTILE_KEY}", "--body", store=populated.url, color=True),
        "json": keys("show", f"{ALICE}:{_HOSTILE_KEY}", "--body", "--json", store=populated.url, color=True),
        "fn": keys("show", "fn:ns\u202e:k\x1b[5m", "--body", store=populated.url, color=True),
        "delete": keys("delete", f"{ALICE}:{_HOSTILE_KEY}", store=populated.url, input="y\n", color=True),
    }
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.output)
        assert not _RAW.search(result.output), (name, result.output)
        lines = result.output.splitlines()
        assert not any("\t" in line for line in lines if not line.startswith("\tindented")), (name, result.output)
    assert "evil\\x1b]0;owned\\x07\\u202egnp.exe" in outputs["list"].output
    assert "  x-note: \\x1b[8mhidden\\x9b\xff" in outputs["show"].output  # \xff is ÿ in latin-1: printable
    assert outputs["body"].output.endswith("hello\\x1b[2J\\x1b[31mred\\x9b31m\\u202eevil\\x7f\\x0d\n\tindented\n\n")
    assert json.loads(outputs["json"].output)["body"] == _HOSTILE_BODY.decode()  # JSON escapes; parsed back, exact
    assert "function:     ns\\u202e (an @idempotent function's result)" in outputs["fn"].output
    assert "key:          k\\x1b[5m" in outputs["fn"].output
    assert f"Delete '{ALICE}:evil\\\\x1b]0;owned" in outputs["delete"].output  # the prompt, inside a repr
    assert f"deleted {ALICE}:evil\\x1b]0;owned\\x07\\u202egnp.exe\n" in outputs["delete"].output


def test_the_escaping_itself() -> None:
    safe = records_module.safe
    assert safe("a\x1b[31mb") == "a\\x1b[31mb"
    assert safe("\x00\x07\x08\t\n\r\x7f\x80\x9b\x9f") == "\\x00\\x07\\x08\\x09\\x0a\\x0d\\x7f\\x80\\x9b\\x9f"
    assert safe("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u2028\u2029") == (
        "\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067\\u2068\\u2069\\u200e\\u200f\\u061c\\u2028\\u2029"
    )
    assert safe("line\n\tnext\r", multiline=True) == "line\n\tnext\\x0d"
    assert safe("plain ASCII, é, 日本, emoji 👍, \\ and \xa0") == "plain ASCII, é, 日本, emoji 👍, \\ and \xa0"


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
        assert "Invalid value for '--principal': a principal digest is hexadecimal" in result.output
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
    for args in (
        ["keys"],
        ["keys", "list"],
        ["keys", "show"],
        ["keys", "delete"],
        ["keys", "resolve"],
        ["keys", "purge"],
    ):
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
