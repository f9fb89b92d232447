"""The optional in-process cache of completed responses (``cache_size``): replays without a store round trip."""

from __future__ import annotations

import pytest

from idempo import ConfigurationError, IdempotencyMiddleware
from idempo._core.cache import CompletedCache
from tests.support.middleware import ClaimSpy, CountingApp, client_for, problem_of

KEY = {"Idempotency-Key": "cache-1"}


async def test_cache_is_off_by_default() -> None:
    """Without ``cache_size``, every replay asks the store."""
    store = ClaimSpy()
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        for _ in range(3):
            await client.post("/pay", content=b"{}", headers=KEY)
    assert (app.calls, store.claims) == (1, 3)


async def test_replays_of_a_response_this_process_recorded_cost_no_store_round_trip() -> None:
    """The first request claims; its replays are answered from the cache, byte-identical, marked replayed."""
    store = ClaimSpy()
    app = CountingApp(status=201, headers=[(b"content-type", b"application/json"), (b"location", b"/pay/1")])
    async with client_for(IdempotencyMiddleware(app, store=store, cache_size=10)) as client:
        first = await client.post("/pay", content=b"{}", headers=KEY)
        replays = [await client.post("/pay", content=b"{}", headers=KEY) for _ in range(3)]
    assert (app.calls, store.claims) == (1, 1)
    for replay in replays:
        assert (replay.status_code, replay.content) == (201, first.content)
        assert replay.headers["location"] == "/pay/1"
        assert replay.headers["idempotent-replayed"] == "true"


async def test_a_response_replayed_from_the_store_is_cached_too() -> None:
    """Another process recorded it (here: another middleware on the same store); one store read, then the cache."""
    store = ClaimSpy()
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store)) as other:
        first = await other.post("/pay", content=b"{}", headers=KEY)
    async with client_for(IdempotencyMiddleware(app, store=store, cache_size=10)) as client:
        replays = [await client.post("/pay", content=b"{}", headers=KEY) for _ in range(3)]
    assert store.claims == 2  # the first request, and the cached middleware's first replay
    assert app.calls == 1
    assert all(replay.content == first.content for replay in replays)


async def test_a_mismatch_is_answered_from_the_cache() -> None:
    """A cached record with another fingerprint is a 422, without asking the store."""
    store = ClaimSpy()
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store, cache_size=10)) as client:
        await client.post("/pay", content=b"{}", headers=KEY)
        other = await client.post("/pay", content=b'{"x": 1}', headers=KEY)
    problem_of(other, 422, "key-reused")
    assert (app.calls, store.claims) == (1, 1)


async def test_responses_that_are_not_stored_are_not_cached() -> None:
    """A 500 is released: the retry claims again and runs again."""
    store = ClaimSpy()
    app = CountingApp(status=500)
    async with client_for(IdempotencyMiddleware(app, store=store, cache_size=10)) as client:
        await client.post("/pay", content=b"{}", headers=KEY)
        await client.post("/pay", content=b"{}", headers=KEY)
    assert (app.calls, store.claims) == (2, 2)


async def test_principals_do_not_share_cache_entries() -> None:
    """The cache is keyed like the store: another caller's same key runs once for that caller."""
    store = ClaimSpy()
    app = CountingApp()
    async with client_for(IdempotencyMiddleware(app, store=store, cache_size=10)) as client:
        alice = await client.post("/pay", content=b"{}", headers={**KEY, "Authorization": "Bearer alice"})
        bob = await client.post("/pay", content=b"{}", headers={**KEY, "Authorization": "Bearer bob"})
    assert app.calls == 2
    assert alice.content != bob.content


async def test_after_delete_a_cached_response_is_still_replayed_until_its_entry_runs_out() -> None:
    """The documented exception: ``Store.delete`` does not reach other processes' caches."""
    store = ClaimSpy()
    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=store, cache_size=10)
    async with client_for(middleware) as client:
        first = await client.post("/pay", content=b"{}", headers=KEY)
        for key in list(store._records):
            await store.delete(key)
        again = await client.post("/pay", content=b"{}", headers=KEY)
    assert again.content == first.content
    assert app.calls == 1


def test_cache_entries_expire_and_the_cache_is_bounded() -> None:
    """Entries live at most ``ttl`` (and never longer than the record), and the oldest makes room."""
    cache = CompletedCache(max_entries=2, ttl=10)
    cache.put("a", "fa", b"A", now=0, lifetime=100)
    cache.put("b", "fb", b"B", now=0, lifetime=5)
    assert cache.get("a", now=9) == ("fa", b"A")
    assert cache.get("a", now=10) is None  # the cache's ttl
    assert cache.get("b", now=5) is None  # the record's own lifetime
    cache.put("c", "fc", b"C", now=20, lifetime=100)
    cache.put("d", "fd", b"D", now=20, lifetime=100)
    cache.put("e", "fe", b"E", now=20, lifetime=100)
    assert len(cache) == 2
    assert cache.get("c", now=21) is None
    assert cache.get("e", now=21) == ("fe", b"E")
    cache.put("gone", "f", b"x", now=0, lifetime=0)
    assert cache.get("gone", now=0) is None


@pytest.mark.parametrize(("size", "ttl"), [(-1, 60), (10, -1)])
def test_negative_cache_options_are_rejected(size: int, ttl: float) -> None:
    with pytest.raises(ConfigurationError):
        IdempotencyMiddleware(CountingApp(), store="memory://", cache_size=size, cache_ttl=ttl)
