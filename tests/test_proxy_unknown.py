"""An upstream exchange whose outcome the proxy cannot know, against the real ``idempo proxy`` and real upstream
processes that count their executions: the key is kept in the "outcome unknown" state, every retry gets a 503
``outcome-unknown`` problem with ``Retry-After``, and the operation never runs a second time, even after the first
attempt finishes on the upstream. A request that provably never left (the upstream refuses connections) still
releases the key, so that its retry runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import poll
from tests.support.proxy import Proxy, Upstream, assert_problem, new_key, new_name, run_proxy, running_upstream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

UNKNOWN_TTL = 300  # --unknown-outcome-ttl: far below --ttl's default (a day), so that Retry-After shows it was used


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with running_upstream(tmp_path_factory.mktemp("upstream")) as server:
        yield server


def _args(upstream: Upstream, directory: Path, *extra: str) -> list[str]:
    store = f"sqlite:///{directory / 'idempo.db'}"
    return ["--upstream", upstream.url, "--store", store, "--unknown-outcome-ttl", str(UNKNOWN_TTL), *extra]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """Two workers, and an upstream timeout short enough for a held request to run into it."""
    directory = tmp_path_factory.mktemp("proxy")
    with run_proxy(directory, _args(upstream, directory, "--upstream-timeout", "1", "--workers", "2")) as running:
        yield running


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        yield http


async def assert_unknown(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
    """A retry of *url* gets the outcome-unknown problem, whichever worker answers (a new connection each time)."""
    for _ in range(3):
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as fresh:
            retry = await fresh.post(url, content=b"pay", headers=headers)
        assert_problem(retry, 503, "outcome-unknown")
        assert 0 < int(retry.headers["retry-after"]) <= UNKNOWN_TTL


async def test_a_slow_upstream_is_504_and_its_retries_never_run_the_operation_again(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    op, headers = new_name(), new_key()
    url = f"/op/{op}?hold=1"
    try:
        document = assert_problem(await client.post(url, content=b"pay", headers=headers), 504, "upstream-timeout")
        assert "outcome is unknown" in str(document["detail"])
        await assert_unknown(client, url, headers)
    finally:
        upstream.release(op)
    await poll(lambda: upstream.done(op), what="the first attempt to finish on the upstream")
    await assert_unknown(client, url, headers)  # and still after it finished: the key is kept, not released
    assert upstream.count(op) == 1


async def test_a_response_cut_off_mid_body_is_an_unknown_outcome(client: httpx.AsyncClient, upstream: Upstream) -> None:
    op, headers = new_name(), new_key()
    url = f"/op/{op}?cut=1"
    with pytest.raises(httpx.RemoteProtocolError):  # the proxy aborts the response it had started
        await client.post(url, content=b"pay", headers=headers)
    await assert_unknown(client, url, headers)
    assert upstream.count(op) == 1


async def test_an_upstream_that_closes_after_reading_the_request_is_502_and_an_unknown_outcome(
    tmp_path: Path,
) -> None:
    closing = Upstream(tmp_path / "closing", closing=True)
    closing.directory.mkdir()
    closing.start()
    try:
        with run_proxy(tmp_path / "proxy", _args(closing, tmp_path)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
                op, headers = new_name(), new_key()
                first = await client.post(f"/op/{op}", content=b"pay", headers=headers)
                document = assert_problem(first, 502, "upstream-unavailable")
                assert "outcome is unknown" in str(document["detail"])
                await assert_unknown(client, f"/op/{op}", headers)
    finally:
        closing.stop()
    assert closing.count(op) == 1


async def test_an_upstream_that_refuses_connections_is_502_and_the_retry_runs(tmp_path: Path) -> None:
    down = Upstream(tmp_path / "down")
    down.directory.mkdir()
    with run_proxy(tmp_path / "proxy", _args(down, tmp_path)) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            op, headers = new_name(), new_key()
            document = assert_problem(await client.post(f"/op/{op}", headers=headers), 502, "upstream-unavailable")
            assert "could not be reached" in str(document["detail"])  # it never left: the key was released
            down.start()
            try:
                retry = await client.post(f"/op/{op}", headers=headers)
                replay = await client.post(f"/op/{op}", headers=headers)
            finally:
                down.stop()
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert replay.headers["idempotent-replayed"] == "true"
    assert down.count(op) == 1
