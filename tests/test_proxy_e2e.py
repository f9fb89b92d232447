"""``idempo proxy --workers 2`` on Redis, in front of a real upstream in another process that counts its side effects.

Every row of the HTTP contract (SPEC section 3) through the proxy, concurrency, an upstream that dies and comes back,
multi-megabyte bodies both ways, forwarding headers, and the proxy's own endpoints. The upstream's executions are
counted in files (``tests/support/proxy_upstream.py``), so "ran once" means the upstream really ran once.
Synchronisation is by polls of what the other processes did (a file, a metric), never sleeps; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import free_port, poll, poll_async, wait_for_done
from tests.support.proxy import Proxy, Upstream, assert_problem, new_key, new_name, run_proxy, running_upstream
from tests.support.proxy_upstream import pattern

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this module's own on the shared Redis; its keys are deleted at the end."""
    prefix = f"idempo-proxy-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with running_upstream(tmp_path_factory.mktemp("upstream")) as server:
        yield server


def _store(redis_url: str, prefix: str) -> str:
    return f"{redis_url}?prefix={prefix}"


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, redis_url: str, redis_prefix: str
) -> Iterator[Proxy]:
    """The main proxy: two workers on Redis, a key required under /op/required-, 4 MiB requests, 1 MiB responses."""
    args = ["--upstream", upstream.url, "--store", _store(redis_url, redis_prefix + "a:"), "--workers", "2"]
    args += ["--require-key-path", "/op/required-*", "--max-request-bytes", "4MiB", "--max-response-bytes", "1MiB"]
    with run_proxy(tmp_path_factory.mktemp("proxy-a"), args) as running:
        yield running


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        yield http


# -- the contract, row by row ------------------------------------------------------------------------------------


async def test_first_request_runs_once_and_every_retry_replays_it(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    first = await client.post(f"/op/{op}", content=b'{"amount":10}', headers=headers)
    assert first.status_code == 201
    assert first.json()["n"] == 1
    assert first.headers["set-cookie"].startswith("session=upstream")
    assert "idempotent-replayed" not in first.headers

    for _ in range(3):
        retry = await client.post(f"/op/{op}", content=b'{"amount":10}', headers=headers)
        assert retry.status_code == 201
        assert retry.content == first.content  # byte-identical
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.headers["x-upstream"] == "yes"
        assert "set-cookie" not in retry.headers  # never replayed unless asked
    assert upstream.count(op) == 1


async def test_a_malformed_key_is_400_and_the_upstream_is_not_called(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op = new_name()
    for bad in ("x" * 256, "two words"):
        assert_problem(await client.post(f"/op/{op}", headers={"Idempotency-Key": bad}), 400)
    assert upstream.count(op) == 0


async def test_a_missing_key_where_required_is_400(client: httpx.AsyncClient, upstream: Upstream) -> None:
    op = "required-" + new_name()
    assert_problem(await client.post(f"/op/{op}", content=b"{}"), 400)
    assert upstream.count(op) == 0
    assert (await client.post(f"/op/{op}", content=b"{}", headers=new_key())).status_code == 201
    # Elsewhere a key is optional: no key, no protection, every request runs.
    other = new_name()
    for _ in range(2):
        assert (await client.post(f"/op/{other}")).status_code == 201
    assert upstream.count(op) == 1
    assert upstream.count(other) == 2


async def test_the_same_key_for_another_request_is_422_and_nothing_runs(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    assert (await client.post(f"/op/{op}", content=b"a", headers=headers)).status_code == 201
    assert_problem(await client.post(f"/op/{op}", content=b"b", headers=headers), 422)  # another body
    assert_problem(await client.post(f"/op/{op}?x=1", content=b"a", headers=headers), 422)  # another query
    assert_problem(await client.put(f"/op/{op}", content=b"a", headers=headers), 422)  # another method
    assert upstream.count(op) == 1


async def test_concurrent_identical_requests_make_one_upstream_call(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    url = f"/op/{op}?hold=1"
    tasks = [asyncio.create_task(client.post(url, content=b"pay", headers=headers)) for _ in range(10)]
    try:
        await poll(lambda: upstream.started(op), what="the first request to reach the upstream")
        await wait_for_done(tasks, 9)  # every other one is answered while the first one holds the key
        conflicts = [task.result() for task in tasks if task.done()]
        for response in conflicts:
            assert_problem(response, 409)
            assert int(response.headers["retry-after"]) >= 0
        assert upstream.count(op) == 1
    finally:
        upstream.release(op)
    await wait_for_done(tasks, 10)
    (winner,) = [task.result() for task in tasks if task.result().status_code != 409]
    assert winner.status_code == 201
    retries = await asyncio.gather(*(client.post(url, content=b"pay", headers=headers) for _ in range(10)))
    assert {(r.status_code, r.content, r.headers["idempotent-replayed"]) for r in retries} == {
        (201, winner.content, "true")
    }
    assert upstream.count(op) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409, 425, 429])
async def test_statuses_that_mean_not_done_are_not_stored_and_a_retry_runs_again(
    client: httpx.AsyncClient, upstream: Upstream, status: int
) -> None:
    op, headers = new_name(), new_key()
    for attempt in (1, 2):
        response = await client.post(f"/op/{op}?status={status}", headers=headers)
        assert response.status_code == status
        assert "idempotent-replayed" not in response.headers
        assert upstream.count(op) == attempt


@pytest.mark.parametrize("status", [200, 302, 404, 422])
async def test_other_statuses_are_stored_and_replayed(
    client: httpx.AsyncClient, upstream: Upstream, status: int
) -> None:
    op, headers = new_name(), new_key()
    first = await client.post(f"/op/{op}?status={status}", headers=headers)
    second = await client.post(f"/op/{op}?status={status}", headers=headers)
    assert first.status_code == second.status_code == status
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert upstream.count(op) == 1


async def test_a_response_over_max_response_bytes_reaches_the_client_whole_and_a_retry_gets_410(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    size = 3 * MiB  # over the proxy's 1 MiB
    first = await client.post(f"/op/{op}?size={size}", headers=headers)
    assert first.status_code == 201
    assert first.content == pattern(size)
    document = assert_problem(await client.post(f"/op/{op}?size={size}", headers=headers), 410)
    assert document["original_status"] == 201
    assert upstream.count(op) == 1


async def test_a_client_that_leaves_mid_request_still_gets_its_response_on_retry(
    proxy: Proxy, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    url = f"/op/{op}?hold=1"
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as leaving:
        task = asyncio.create_task(leaving.post(url, content=b"x", headers=headers))
        await poll(lambda: upstream.started(op), what="the request to reach the upstream")
        task.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await task
    upstream.release(op)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as retrying:

        async def answered() -> httpx.Response | None:
            response = await retrying.post(url, content=b"x", headers=headers)
            return None if response.status_code == 409 else response

        retry = await poll_async(answered, what="the first request to finish", interval=0.05)
    assert retry is not None
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert upstream.count(op) == 1


# -- bodies ----------------------------------------------------------------------------------------------------


async def test_large_bodies_stream_both_ways(client: httpx.AsyncClient, upstream: Upstream) -> None:
    size = 12 * MiB  # three times max_request_bytes: an unkeyed body is streamed, never buffered nor limited
    data = pattern(size)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, size, 256 * 1024):
            yield data[start : start + 256 * 1024]

    op = new_name()
    upload = await client.post(f"/op/{op}", content=chunks())
    assert upload.status_code == 201
    assert upload.json()["length"] == size
    assert upload.json()["sha256"] == hashlib.sha256(data).hexdigest()

    async with client.stream("GET", f"/op/{new_name()}?size={size}") as download:
        assert download.status_code == 201
        received = bytearray()
        pieces = 0
        async for chunk in download.aiter_raw():
            received += chunk
            pieces += 1
    assert bytes(received) == data
    assert pieces > 1


async def test_a_keyed_body_is_fingerprinted_whole_up_to_max_request_bytes(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    body = pattern(3 * MiB)
    first = await client.post(f"/op/{op}", content=body, headers=headers)
    assert first.status_code == 201
    assert first.json()["sha256"] == hashlib.sha256(body).hexdigest()
    replay = await client.post(f"/op/{op}", content=body, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert_problem(await client.post(f"/op/{op}", content=body[:-1] + b"!", headers=headers), 422)
    too_large = new_name()
    assert_problem(await client.post(f"/op/{too_large}", content=pattern(5 * MiB), headers=new_key()), 413)
    assert upstream.count(op) == 1
    assert upstream.count(too_large) == 0


# -- forwarding ------------------------------------------------------------------------------------------------


async def test_forwarding_headers(proxy: Proxy, upstream: Upstream) -> None:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        del http.headers["accept-encoding"]  # so that we see whether the proxy adds one
        response = await http.post(
            "/echo/../echo?a=1&b=%20",
            content=b"hi",
            headers={
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https",
                "X-Kept": "yes",
            },
        )
    assert response.status_code == 200
    seen = response.json()
    headers: dict[str, list[str]] = {}
    for header, value in seen["headers"]:
        headers.setdefault(header, []).append(value)
    for hop in ("connection", "x-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization"):
        assert hop not in headers, hop
    assert "accept-encoding" not in headers
    assert headers["x-kept"] == ["yes"]
    host = proxy.url.removeprefix("http://")
    assert headers["host"] == [host]  # the client's Host, by default
    assert headers["x-forwarded-for"] == ["127.0.0.1"]  # the peer's, not the client's claim
    assert headers["x-forwarded-proto"] == ["http"]  # this hop's, not the client's claim
    assert headers["x-forwarded-host"] == [host]
    assert seen["query"] == "a=1&b=%20"
    assert seen["length"] == 2


async def test_encoded_bodies_are_forwarded_raw(proxy: Proxy, upstream: Upstream) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        via_proxy = bytearray()
        async with http.stream("GET", proxy.url + "/echo?gzip=1", headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["content-encoding"] == "gzip"
            length = int(response.headers["content-length"])
            async for chunk in response.aiter_raw():
                via_proxy += chunk
    assert len(via_proxy) == length
    seen = json.loads(gzip.decompress(bytes(via_proxy)))
    assert ["accept-encoding", "gzip"] in seen["headers"]


# -- the proxy's own endpoints ----------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_healthz_and_metrics_count_every_worker(client: httpx.AsyncClient, proxy: Proxy) -> None:
    health = await client.get("/_idempo/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await client.get("/_idempo/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return _samples(response.text)

    def requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
        return samples.get(("idempo_requests_total", (("outcome", outcome),)), 0.0)

    async def scrape_worker() -> tuple[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """A scrape on a new connection, and the pid of the worker that answered it."""
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as fresh:
            pid = (await fresh.get("/_idempo/healthz")).json()["pid"]
            response = await fresh.get("/_idempo/metrics")  # the same connection: the same worker
        return pid, _samples(response.text)

    before = await scrape()
    op, headers = new_name(), new_key()
    await client.post(f"/op/{op}", content=b"1", headers=headers)  # executed
    await client.post(f"/op/{op}", content=b"1", headers=headers)  # replayed
    await client.post(f"/op/{op}", content=b"2", headers=headers)  # mismatch
    await client.post(f"/op/{op}", headers={"Idempotency-Key": "x" * 300})  # bad_key
    await client.get("/echo")  # passthrough
    # Whichever worker answers the scrape, it counts what both did: scrape until both have answered.
    by_worker: dict[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for _ in range(200):
        pid, samples = await scrape_worker()
        by_worker.setdefault(pid, samples)
        if len(by_worker) == 2:
            break
    assert len(by_worker) == 2, "one worker answered every scrape"
    scrapes = list(by_worker.values())
    for after in scrapes:
        for outcome in ("executed", "replayed", "mismatch", "bad_key", "passthrough"):
            assert requests(after, outcome) - requests(before, outcome) == 1, outcome
        claims = ("idempo_store_call_seconds_count", (("operation", "claim"),))
        assert after[claims] - before[claims] == 3
        assert after[("idempo_proxy_upstream_seconds_count", ())] >= 2
    # The proxy's own paths are not counted as requests, nor forwarded.
    assert requests(scrapes[-1], "passthrough") == requests(scrapes[0], "passthrough")

    def logged() -> list[dict[str, object]]:
        return [r for r in proxy.access_log() if r["path"] == f"/op/{op}"]

    await poll(lambda: len(logged()) == 4, what="four access log lines")
    records = logged()
    assert [r["outcome"] for r in records] == ["executed", "replayed", "mismatch", "bad_key"]
    assert [r["status"] for r in records] == [201, 201, 422, 400]
    assert all(r["method"] == "POST" and isinstance(r["duration_ms"], float) for r in records)


# -- the other proxies: wait, an upstream that dies or is slow, a store that is down ---------------------------


async def test_with_on_conflict_wait_a_retry_waits_for_the_first_and_replays_it(
    tmp_path: Path, upstream: Upstream, redis_url: str, redis_prefix: str
) -> None:
    args = ["--upstream", upstream.url, "--store", _store(redis_url, redis_prefix + "b:")]
    args += ["--on-conflict", "wait", "--wait-timeout", "60"]
    with run_proxy(tmp_path, args) as waiting:
        async with httpx.AsyncClient(base_url=waiting.url, timeout=60) as http:
            op, headers = new_name(), new_key()
            first = asyncio.create_task(http.post(f"/op/{op}?hold=1", headers=headers))
            await poll(lambda: upstream.started(op), what="the first request to reach the upstream")
            second = asyncio.create_task(http.post(f"/op/{op}?hold=1", headers=headers))

            async def claims() -> float:
                text = (await http.get("/_idempo/metrics")).text
                return _samples(text)[("idempo_store_call_seconds_count", (("operation", "claim"),))]

            async def polling() -> bool:  # its first claim found the key in progress, and it claimed again
                return await claims() >= 3

            await poll_async(polling, what="the second request to poll the store")
            assert not second.done()
            upstream.release(op)
            one, two = await asyncio.gather(first, second)
    assert one.status_code == two.status_code == 201
    assert two.headers["idempotent-replayed"] == "true"
    assert two.content == one.content
    assert upstream.count(op) == 1


async def test_a_dead_upstream_is_502_and_a_retry_after_it_restarts_runs_once(proxy: Proxy, upstream: Upstream) -> None:
    op, headers = new_name(), new_key()
    upstream.kill()
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
            for _ in range(2):
                document = assert_problem(await http.post(f"/op/{op}", content=b"x", headers=headers), 502)
                assert document["title"] == "Upstream unavailable"
    finally:
        upstream.start()
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        first = await http.post(f"/op/{op}", content=b"x", headers=headers)
        again = await http.post(f"/op/{op}", content=b"x", headers=headers)
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert upstream.count(op) == 1


def test_a_store_that_does_not_answer_at_start_up_stops_the_proxy(tmp_path: Path, upstream: Upstream) -> None:
    """A wrong store address is found at start-up, with what to do, not by the first keyed request."""
    down = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.5"
    with pytest.raises(AssertionError, match="exited with") as refused:  # noqa: SIM117 - the message is the point
        with run_proxy(tmp_path, ["--upstream", upstream.url, "--store", down]):
            pass
    assert "does not answer" in str(refused.value)
    assert "--startup-check warn" in str(refused.value)


async def test_a_store_that_is_down_is_503_and_nothing_runs(tmp_path: Path, upstream: Upstream) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.5"
    args = ["--upstream", upstream.url, "--store", down, "--retry-after", "7", "--startup-check", "warn"]
    with run_proxy(tmp_path, args) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
            op = new_name()
            response = await http.post(f"/op/{op}", headers=new_key())
            assert_problem(response, 503)
            assert response.headers["retry-after"] == "7"
            assert (await http.get("/echo")).status_code == 200  # unprotected requests still flow
    assert upstream.count(op) == 0


async def test_the_default_store_is_an_sqlite_file_in_the_working_directory_shared_by_the_workers(
    tmp_path: Path, upstream: Upstream
) -> None:
    # Configured the two other ways: a file, and the environment over it.
    (tmp_path / "idempo.toml").write_text(f'[proxy]\nupstream = "{upstream.url}"\nworkers = 2\nprefix = "/-/"\n')
    env = {"IDEMPO_PROXY_CONFIG": "idempo.toml", "IDEMPO_PROXY_PREFIX": "/-/proxy/"}
    op, headers = new_name(), new_key()
    with run_proxy(tmp_path, [], env=env, prefix="/-/proxy/") as running:
        answers = []
        for _ in range(6):  # a connection each, so that both workers may take some
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
                answers.append(await http.post(f"/op/{op}", content=b"x", headers=headers))
        assert "store sqlite:///idempo-proxy.db, 2 workers" in running.log()
    assert [a.status_code for a in answers] == [201] * 6
    assert [a.headers.get("idempotent-replayed") for a in answers] == [None] + ["true"] * 5
    assert upstream.count(op) == 1
    assert (tmp_path / "idempo-proxy.db").is_file()
