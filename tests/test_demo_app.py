"""The demo service in-process (``httpx.ASGITransport``): the charges API behind the middleware, and each switch of
the page as the server applies it. The page itself, in a browser, is tests/browser's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from idempo import MemoryStore
from idempo._demo import Ledger, create_app
from idempo.static import script_source


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def client(ledger: Ledger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(MemoryStore(), ledger=ledger, slow_seconds=0.01)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://demo") as http:
        yield http


async def pay(
    client: httpx.AsyncClient, key: str | None, *, amount: int = 1000, faults: str = "", submission: str | None = None
) -> httpx.Response:
    """``POST /api/charges`` as the page sends it."""
    headers = {"X-Demo-Faults": faults}
    if key is not None:
        headers["Idempotency-Key"] = key
    if submission is not None:
        headers["X-Demo-Submission"] = submission
    return await client.post("/api/charges", json={"amount": amount}, headers=headers)


async def test_a_keyed_charge_runs_once_and_is_replayed(client: httpx.AsyncClient, ledger: Ledger) -> None:
    first = await pay(client, "k1")
    again = await pay(client, "k1")
    assert first.status_code == again.status_code == 201
    assert first.content == again.content
    assert again.headers["idempotent-replayed"] == "true"
    assert [c["idempotency_key"] for c in ledger.charges] == ["k1"]
    listed = (await client.get("/api/charges")).json()
    assert (listed["count"], listed["total"]) == (1, 1000)
    assert [(a["key"], a["status"], a["replayed"]) for a in ledger.attempts] == [("k1", 201, False), ("k1", 201, True)]


async def test_without_a_key_every_request_charges(client: httpx.AsyncClient, ledger: Ledger) -> None:
    for _ in range(2):
        assert (await pay(client, None)).status_code == 201
    assert [c["idempotency_key"] for c in ledger.charges] == [None, None]


async def test_the_same_key_with_another_amount_is_422(client: httpx.AsyncClient, ledger: Ledger) -> None:
    await pay(client, "k1")
    other = await pay(client, "k1", amount=2500)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert len(ledger.charges) == 1


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"amount": 0}', b'{"amount": 1.5}', b'{"amount": true}'])
async def test_an_invalid_charge_is_400(client: httpx.AsyncClient, ledger: Ledger, body: bytes) -> None:
    response = await client.post("/api/charges", content=body)
    assert response.status_code == 400
    assert response.json()["title"] == "Invalid charge"
    assert ledger.charges == []


async def test_fail_first_refuses_only_the_first_attempt(client: httpx.AsyncClient, ledger: Ledger) -> None:
    first = await pay(client, "k1", faults="fail-first", submission="s1")
    assert (first.status_code, first.headers["retry-after"]) == (503, "1")
    assert ledger.charges == []
    second = await pay(client, "k1", faults="fail-first", submission="s1")
    assert second.status_code == 201
    assert len(ledger.charges) == 1


async def test_drop_makes_the_charge_and_loses_the_response(client: httpx.AsyncClient, ledger: Ledger) -> None:
    """In-process there is no connection to cut: the app raises instead, which the client sees as a failure."""
    assert (await pay(client, "k1", faults="fail-first,drop", submission="s1")).status_code == 503
    with pytest.raises(ConnectionAbortedError):
        await pay(client, "k1", faults="fail-first,drop", submission="s1")
    assert len(ledger.charges) == 1  # made before the response was dropped
    retry = await pay(client, "k1", faults="fail-first,drop", submission="s1")
    assert (retry.status_code, retry.headers["idempotent-replayed"]) == (201, "true")
    assert len(ledger.charges) == 1
    assert [(a["fault"], a["status"]) for a in ledger.attempts] == [("fail-first", 503), ("drop", None), (None, 201)]


async def test_one_shot_faults_need_a_submission(client: httpx.AsyncClient, ledger: Ledger) -> None:
    response = await pay(client, "k1", faults="fail-first,drop")
    assert response.status_code == 201
    assert ledger.attempts[0]["fault"] is None


async def test_slow_still_charges_once(client: httpx.AsyncClient, ledger: Ledger) -> None:
    response = await pay(client, "k1", faults="slow", submission="s")
    assert response.status_code == 201
    assert len(ledger.charges) == 1


async def test_every_response_closes_its_connection(client: httpx.AsyncClient) -> None:
    """So that a dropped response reaches the page as a network error, not as the browser's own silent resend."""
    for response in (
        await client.get("/"),
        await client.get("/api/charges"),
        await pay(client, "k1"),
        await pay(client, "k2", faults="fail-first", submission="s"),
    ):
        assert response.headers["connection"] == "close"


async def test_the_page_and_the_script(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert 'from "/idempo.js"' in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # self-contained: no CDN, nothing remote
    script = await client.get("/idempo.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.text == script_source()
    assert (await client.get("/health")).json() == {"ok": True}


def test_the_ledger_forgets_the_oldest_submissions() -> None:
    ledger = Ledger()
    assert [ledger.arrival("a"), ledger.arrival("a")] == [1, 2]
    for n in range(1000):
        ledger.arrival(f"s{n}")
    assert "a" not in ledger.seen
    assert len(ledger.seen) == 1000
    assert ledger.arrival("s999") == 2
