"""What the end-to-end tests check, written once and run against every store: the test modules start
``uvicorn --workers 4`` on their store and call these.

Each scenario uses keys and operation names of its own (fresh UUIDs), so that scenarios can share one server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest

from idempo import Acquired, State, Store, fingerprint_request
from tests.support.processes import WORKERS, Server, events, lines, poll, store_key, wait_for_done

__all__ = [
    "Exchange",
    "Outage",
    "Traffic",
    "execute_once_across_workers",
    "retry_runs_once_the_lease_of_a_killed_worker_runs_out",
    "stale_owner_cannot_overwrite_the_new_owner",
    "store_outage_while_requests_flow",
    "wait_and_all_get_the_one_response",
]

CONCURRENCY = 50
BODY = b'{"amount": 1999, "currency": "eur"}'
MAX_EXTRA = 40  # new connections tried, at most, to reach a second worker


def _headers(key: str, tag: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "X-E2E-Tag": tag, "Content-Type": "application/json"}


def _client(server: Server) -> httpx.AsyncClient:
    # One connection per request in flight, so that the listening socket hands them to several workers.
    limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY + 10)
    return httpx.AsyncClient(base_url=server.base_url, timeout=20.0, limits=limits)


def _arrived(arrivals_file: Path, count: int) -> bool:
    """Whether *count* requests have arrived (a probe for :func:`poll`)."""
    return len(lines(arrivals_file)) >= count


async def _cancel(tasks: list[asyncio.Task[httpx.Response]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- fifty identical requests at once ---------------------------------------------------------------------------


async def _conflicts_from_another_worker(
    server: Server, path: str, key: str, name: str, tasks: list[asyncio.Task[httpx.Response]]
) -> list[httpx.Response]:
    """While the operation is held, make sure 409s came from at least two workers (so at least one is not the
    worker running it): if the listening socket happened to hand the fifty connections to one worker, send more
    identical requests, each on a new connection, until another worker answers one. Returns those extra answers."""
    pids = {int(task.result().headers["x-worker-pid"]) for task in tasks if task.done()}
    extra: list[httpx.Response] = []
    while len(pids) < 2:
        assert len(extra) < MAX_EXTRA, f"{len(extra)} more requests on new connections all went to worker {pids}"
        async with _client(server) as fresh:
            response = await fresh.post(path, content=BODY, headers=_headers(key, name))
        assert response.status_code == 409, response.text
        extra.append(response)
        pids.add(int(response.headers["x-worker-pid"]))
    return extra


async def _waiters_in_another_worker(
    server: Server,
    path: str,
    key: str,
    name: str,
    tasks: list[asyncio.Task[httpx.Response]],
    fresh_clients: list[httpx.AsyncClient],
) -> None:
    """While the operation is held, make sure requests arrived at at least two workers (so at least one waits in a
    worker that does not run the operation): if not, add waiting requests, each on a new connection, to *tasks*."""
    arrivals_file = server.side_dir / f"{name}.arrivals"
    while len(set(lines(arrivals_file))) < 2:
        assert len(fresh_clients) < MAX_EXTRA, f"{len(fresh_clients)} more requests all went to one worker"
        fresh = _client(server)
        fresh_clients.append(fresh)
        tasks.append(asyncio.create_task(fresh.post(path, content=BODY, headers=_headers(key, name))))
        count = len(tasks)
        await poll(partial(_arrived, arrivals_file, count), what="one more request to arrive")


async def execute_once_across_workers(server: Server) -> None:
    """Fifty identical requests at once (``on_conflict="reject"``): one execution, in one worker; every other
    request a 409 with ``Retry-After``, from at least two workers; then a retry replays the same bytes."""
    name = f"reject-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/charge/{name}"
    hold = server.side_dir / f"{name}.hold"
    hold.touch()  # the first execution holds until we release it, so every other request meets it in progress
    async with _client(server) as client:
        tasks = [
            asyncio.create_task(client.post(path, content=BODY, headers=_headers(key, name)))
            for _ in range(CONCURRENCY)
        ]
        try:
            # Everyone but the owner of the key is answered while the operation is still running.
            await wait_for_done(tasks, CONCURRENCY - 1)
            assert [what for what, _ in events(server, name)] == ["start"]
            extra = await _conflicts_from_another_worker(server, path, key, name, tasks)
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            await _cancel(tasks)

        # Exactly one execution, in one of the workers, that ran to completion.
        recorded = events(server, name)
        assert len(recorded) == 2, recorded
        (started, runner), (finished, finisher) = recorded
        assert (started, finished) == ("start", "done")
        assert runner == finisher
        assert runner in server.worker_pids()

        originals = [response for response in responses if response.status_code == 200]
        conflicts = [response for response in responses if response.status_code == 409]
        assert len(originals) == 1, [response.status_code for response in responses]
        assert len(conflicts) == CONCURRENCY - 1, [response.status_code for response in responses]
        conflicts += extra
        original = originals[0]
        assert "idempotent-replayed" not in original.headers
        document = original.json()
        assert document["pid"] == runner == int(original.headers["x-worker-pid"])
        assert document["key"] == key
        assert document["request_body"] == BODY.decode()
        for conflict in conflicts:
            assert conflict.headers["content-type"] == "application/problem+json"
            assert conflict.json()["type"] == "urn:idempo:problem:in-progress"
            assert int(conflict.headers["retry-after"]) >= 1

        # The requests really were spread over several worker processes, and the 409s came from more than one.
        arrivals = {int(pid) for pid in lines(server.side_dir / f"{name}.arrivals")}
        answered_by = [int(response.headers["x-worker-pid"]) for response in responses]
        answered_by += [int(response.headers["x-worker-pid"]) for response in extra]
        assert len(lines(server.side_dir / f"{name}.arrivals")) == CONCURRENCY + len(extra)
        assert arrivals == set(answered_by)
        assert arrivals <= server.worker_pids()
        assert len({int(conflict.headers["x-worker-pid"]) for conflict in conflicts}) >= 2, answered_by

        # A retry after completion is a replay of the same bytes, and runs nothing.
        replay = await client.post(path, content=BODY, headers=_headers(key, name))
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == original.content
        assert len(events(server, name)) == 2


async def wait_and_all_get_the_one_response(server: Server) -> None:
    """Fifty identical requests at once (``on_conflict="wait"``), waiting in at least two workers: one execution,
    and every request gets its response."""
    name = f"wait-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/wait/charge/{name}"
    hold = server.side_dir / f"{name}.hold"
    arrivals_file = server.side_dir / f"{name}.arrivals"
    hold.touch()
    fresh_clients: list[httpx.AsyncClient] = []
    async with _client(server) as client:
        tasks = [
            asyncio.create_task(client.post(path, content=BODY, headers=_headers(key, name)))
            for _ in range(CONCURRENCY)
        ]
        try:
            await poll(partial(_arrived, arrivals_file, CONCURRENCY), what=f"{CONCURRENCY} requests to arrive")
            await poll(partial(events, server, name), what="the operation to start")
            await _waiters_in_another_worker(server, path, key, name, tasks, fresh_clients)
            # With on_conflict="wait", nobody is answered while the operation runs: they all wait for it.
            assert not any(task.done() for task in tasks)
            hold.unlink()
            responses = await asyncio.gather(*tasks)
        finally:
            hold.unlink(missing_ok=True)
            await _cancel(tasks)
            for fresh in fresh_clients:
                await fresh.aclose()

    recorded = events(server, name)
    assert [what for what, _ in recorded] == ["start", "done"], recorded
    total = len(tasks)
    assert [response.status_code for response in responses] == [200] * total
    assert len({response.content for response in responses}) == 1
    replayed = [response.headers.get("idempotent-replayed") for response in responses]
    assert replayed.count("true") == total - 1
    assert replayed.count(None) == 1
    document = json.loads(responses[0].content)
    assert document["pid"] == recorded[0][1]
    assert document["key"] == key
    waiters = {int(pid) for pid in lines(arrivals_file)}
    assert len(waiters) >= 2, waiters
    assert waiters <= server.worker_pids()


# -- a worker killed mid-request --------------------------------------------------------------------------------


async def _lease_expiry(store: Store, key: str) -> float:
    """When the lease of *key* (no Authorization header: the empty principal) runs out, read from the store."""
    record = await store.get(store_key(key))
    assert record is not None
    assert record.state is State.IN_PROGRESS
    return record.lease_expires_at


async def _until_not_in_progress(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> httpx.Response:
    """Retry until the answer is not 409, as a client honouring ``Retry-After`` would (faster), or fail."""
    deadline = time.monotonic() + 15.0
    while True:
        retry = await client.post(path, content=BODY, headers=headers)
        if retry.status_code != 409:
            return retry
        assert "retry-after" in retry.headers
        assert time.monotonic() < deadline, "the key stayed in progress 15 s after its lease should have run out"
        await asyncio.sleep(0.1)  # polling the other processes' view of the lease


async def retry_runs_once_the_lease_of_a_killed_worker_runs_out(
    server: Server, store: Store, *, prefix: str, lease: float
) -> None:
    """SIGKILL the worker running an operation (``POST <prefix>/charge/<name>``, whose middleware has *lease*):
    an immediate retry gets 409; once the lease has run out a retry runs the operation in another worker; and a
    further retry replays it. *store* is the workers' store, to read the lease from."""
    name = f"crash-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"{prefix}/charge/{name}"
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    hold = server.side_dir / f"{name}.hold"
    hold.touch()  # the first execution "works" until its worker is killed
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0) as client:
        first = asyncio.create_task(client.post(path, content=BODY, headers=headers))
        try:
            started = await poll(partial(events, server, name), what="the operation to start")
            victim = started[0][1]
            assert victim in server.worker_pids()  # one of our uvicorn's workers, never anything else
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                await first  # its worker died under it: no response
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        hold.unlink()  # a retry's execution does not hold
        lease_expires_at = await _lease_expiry(store, key)

        # At once: the dead worker's lease is still honoured.
        immediate = await client.post(path, content=BODY, headers=headers)
        assert time.time() < lease_expires_at, "the retry came too late to see the lease held; raise the lease"
        assert immediate.status_code == 409
        assert immediate.json()["type"] == "urn:idempo:problem:in-progress"
        assert 1 <= int(immediate.headers["retry-after"]) <= lease

        # Once the lease has run out, a retry takes the key over and runs the operation.
        retry = await _until_not_in_progress(client, path, headers)
        assert retry.status_code == 200, retry.text
        assert time.time() >= lease_expires_at
        assert "idempotent-replayed" not in retry.headers
        runner = retry.json()["pid"]
        assert runner != victim
        assert runner == int(retry.headers["x-worker-pid"])
        # Two executions started, the killed one never finished.
        assert events(server, name) == [("start", victim), ("start", runner), ("done", runner)]

        # And from then on, the retry's response is replayed.
        replay = await client.post(path, content=BODY, headers=headers)
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == retry.content
        assert len(events(server, name)) == 3


# -- a stale owner's late completion ----------------------------------------------------------------------------


async def stale_owner_cannot_overwrite_the_new_owner(server: Server, store: Store) -> None:
    """A dead owner's late ``complete`` (simulated: the test claims a key itself with a short lease, token A, and
    lets it run out) never overwrites the record of the request that took the key over through the workers,
    neither while that request runs nor after it completed; nor can it renew or release the key."""
    stale_lease = 2.0
    name = f"stale-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    path = f"/charge/{name}"
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    hold = server.side_dir / f"{name}.hold"
    scoped = store_key(key)
    # The same request as the one the client then sends through the workers (a different one would be a 422).
    fingerprint = fingerprint_request("POST", path, b"", BODY, b"application/json")
    claimed = await store.claim(scoped, fingerprint, lease=stale_lease, ttl=600)
    assert isinstance(claimed, Acquired), claimed
    stale_token = claimed.token
    record = await store.get(scoped)
    assert record is not None
    assert record.token == stale_token
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20.0) as client:
        # The stale owner's lease is honoured while it lasts.
        held = await client.post(path, content=BODY, headers=headers)
        assert time.time() < record.lease_expires_at, "the request came too late to see the lease held"
        assert held.status_code == 409, held.text
        assert held.json()["type"] == "urn:idempo:problem:in-progress"
        assert events(server, name) == []

        # Once it has run out, a request takes the key over, and runs (held, so that the stale owner can try to
        # complete while the new owner is still running).
        await poll(lambda: time.time() >= record.lease_expires_at, what="the stale owner's lease to run out")
        hold.touch()
        try:
            new_owner = await _until_started(client, path, headers, server, name)
            running = await store.get(scoped)
            assert running is not None
            assert running.state is State.IN_PROGRESS
            assert running.token not in ("", stale_token)
            assert not await store.complete(scoped, stale_token, b"stale", ttl=600)
            assert not await store.renew(scoped, stale_token, lease=600)
            assert not await store.release(scoped, stale_token)
            assert await store.get(scoped) == running  # untouched
            hold.unlink()
            response = await new_owner
        finally:
            hold.unlink(missing_ok=True)
        assert response.status_code == 200, response.text
        assert "idempotent-replayed" not in response.headers
        assert events(server, name) == [("start", response.json()["pid"]), ("done", response.json()["pid"])]

        # After the new owner completed, the stale token still changes nothing.
        completed = await store.get(scoped)
        assert completed is not None
        assert completed.state is State.COMPLETED
        assert not await store.complete(scoped, stale_token, b"stale", ttl=600)
        assert not await store.release(scoped, stale_token)
        after = await store.get(scoped)
        assert after == completed
        assert after.payload != b"stale"
        replay = await client.post(path, content=BODY, headers=headers)
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == response.content
        assert len(events(server, name)) == 2


async def _until_started(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], server: Server, name: str
) -> asyncio.Task[httpx.Response]:
    """Send the request until one takes the key (its operation starts, and holds); that request, still running."""
    deadline = time.monotonic() + 15.0
    while True:
        task = asyncio.create_task(client.post(path, content=BODY, headers=headers))
        while not task.done() and not events(server, name):  # noqa: ASYNC110 - another process's state
            await asyncio.sleep(0.02)
        if events(server, name):
            return task
        response = task.result()
        assert response.status_code == 409, response.text
        assert time.monotonic() < deadline, "the key stayed in progress 15 s after the stale owner's lease ran out"
        await asyncio.sleep(0.1)


# -- traffic while the store fails ------------------------------------------------------------------------------

TRAFFIC_STREAMS = 4
TRAFFIC_PACE = 0.02  # seconds each stream pauses between keys: traffic that flows without flooding two cores
ANSWER_BOUND = 10.0  # seconds any request may take, whatever the store does: more is a hang
_PROBLEMS = {409: "urn:idempo:problem:in-progress", 503: "urn:idempo:problem:store-unavailable"}


@dataclass(frozen=True)
class Exchange:
    """One request of :class:`Traffic`, and what came back."""

    key: str
    name: str
    generation: int  # of the traffic, when the key was made (and so when this request was sent)
    sent_at: float  # time.monotonic()
    answered_at: float
    status: int | None  # None: no response (a broken connection, or no answer within ANSWER_BOUND)
    replayed: bool = False
    pid: int | None = None
    content_type: str = ""
    retry_after: str | None = None
    problem_type: str | None = None
    content: bytes = b""
    error: str = ""


@dataclass
class Traffic:
    """Requests that keep flowing while a test breaks the store: each of *streams* clients takes a fresh key (and
    operation ``POST /charge/<name>``), sends it twice at once, then once more, and moves on to a new key.

    The test moves the traffic into a new *generation* when it breaks or repairs the store; a key is never sent
    again once the generation it was made in is over (after a Redis restart that lost every record, a key of before
    would rightly run again)."""

    server: Server
    streams: int = TRAFFIC_STREAMS
    generation: int = 0
    exchanges: list[Exchange] = field(default_factory=list)
    in_flight: dict[int, int] = field(default_factory=dict)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._stream()) for _ in range(self.streams)]

    async def stop(self) -> None:
        """Let every stream finish its request in flight, and end."""
        self._stopping.set()
        try:
            async with asyncio.timeout(ANSWER_BOUND * 3):
                await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def next_generation(self) -> None:
        self.generation += 1

    def count(self, *, generation: int, status: int | None, replayed: bool | None = None) -> int:
        """How many requests sent in *generation* got *status* (and were, or were not, *replayed*). For the probes
        of :func:`poll`: fails at once if any request so far got anything but 200, 409 or 503."""
        unexpected = [exchange for exchange in self.exchanges if exchange.status not in (200, 409, 503)]
        assert not unexpected, unexpected[:3]
        return sum(
            1
            for exchange in self.exchanges
            if exchange.generation == generation
            and exchange.status == status
            and (replayed is None or exchange.replayed is replayed)
        )

    async def drained(self, generation: int) -> None:
        """Wait until every request sent in *generation* has been answered."""
        await poll(lambda: self.in_flight.get(generation, 0) == 0, what=f"generation {generation} to be answered")

    async def _stream(self) -> None:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(base_url=self.server.base_url, timeout=ANSWER_BOUND, limits=limits) as client:
            while not self._stopping.is_set():
                generation = self.generation
                key = str(uuid.uuid4())
                name = f"traffic-{uuid.uuid4().hex}"
                for at_once in (2, 1):
                    if self._stopping.is_set() or self.generation != generation:
                        break
                    await asyncio.gather(*(self._send(client, key, name, generation) for _ in range(at_once)))
                await asyncio.sleep(TRAFFIC_PACE)  # pacing, not synchronisation

    async def _send(self, client: httpx.AsyncClient, key: str, name: str, generation: int) -> None:
        self.in_flight[generation] = self.in_flight.get(generation, 0) + 1
        started = time.monotonic()
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        try:
            async with asyncio.timeout(ANSWER_BOUND):
                response = await client.post(f"/charge/{name}", content=BODY, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            exchange = Exchange(key, name, generation, started, time.monotonic(), None, error=repr(exc))
        else:
            content_type = response.headers.get("content-type", "")
            problem_type = response.json().get("type") if content_type == "application/problem+json" else None
            pid = response.headers.get("x-worker-pid")
            exchange = Exchange(
                key,
                name,
                generation,
                started,
                time.monotonic(),
                response.status_code,
                replayed=response.headers.get("idempotent-replayed") == "true",
                pid=None if pid is None else int(pid),
                content_type=content_type,
                retry_after=response.headers.get("retry-after"),
                problem_type=problem_type,
                content=response.content,
            )
        finally:
            self.in_flight[generation] -= 1
        self.exchanges.append(exchange)

    def check(self) -> dict[int, int]:
        """Assert what must hold of every request and every key, whatever the store did; return how many requests
        got each status.

        Every request was answered within ANSWER_BOUND, with 200, 409 or 503 (never a 500, never a broken
        connection); 409 and 503 are problem documents with ``Retry-After``; and no operation ran twice: per key,
        at most one execution (counted from the side effects, across processes), which is the one original 200,
        and every other 200 is a replay of its very bytes."""
        assert self.exchanges, "no traffic at all"
        statuses: dict[int, int] = {}
        by_key: dict[str, list[Exchange]] = {}
        for exchange in self.exchanges:
            assert exchange.status in (200, 409, 503), exchange
            assert exchange.answered_at - exchange.sent_at < ANSWER_BOUND, exchange
            statuses[exchange.status] = statuses.get(exchange.status, 0) + 1
            by_key.setdefault(exchange.key, []).append(exchange)
            if exchange.status == 200:
                continue
            assert exchange.content_type == "application/problem+json", exchange
            assert exchange.problem_type == _PROBLEMS[exchange.status], exchange
            assert exchange.retry_after is not None, exchange
            assert int(exchange.retry_after) >= 1, exchange
        for exchanges in by_key.values():
            name = exchanges[0].name
            recorded = events(self.server, name)
            starts = [pid for what, pid in recorded if what == "start"]
            dones = [pid for what, pid in recorded if what == "done"]
            originals = [exchange for exchange in exchanges if exchange.status == 200 and not exchange.replayed]
            assert len(starts) <= 1, (name, recorded, exchanges)
            assert starts == dones == [exchange.pid for exchange in originals], (name, recorded, exchanges)
            contents = {exchange.content for exchange in exchanges if exchange.status == 200}
            assert len(contents) <= 1, (name, exchanges)
        return statuses


@dataclass(frozen=True)
class Outage:
    """What :func:`store_outage_while_requests_flow` saw, for the store-specific checks of the caller."""

    traffic: Traffic
    broken_at: float  # time.monotonic(), once the store was down
    repaired_at: float  # time.monotonic(), just before the store was brought back
    held_key: str
    held_path: str
    held_response: httpx.Response  # of the operation that was running when the store went down


async def store_outage_while_requests_flow(
    server: Server, *, break_store: Callable[[], object], repair_store: Callable[[], object], what: str
) -> Outage:
    """The store goes down (*break_store*, run in a thread) while requests flow and while one operation runs; then
    comes back (*repair_store*) while the same uvicorn keeps serving.

    Checks: every request is answered within ANSWER_BOUND with 200, 409 or 503 and nothing runs twice
    (:meth:`Traffic.check`); every request sent and answered while the store was down is a 503
    ``store-unavailable`` with ``Retry-After``; the operation that was running when the store went down still
    gives its client its response, and a retry of it meanwhile is a 503 too; once the store is back, new keys
    run (and replay) in the very same worker processes, none of which crashed or was restarted, and uvicorn
    logged no traceback."""
    workers = await poll(_all_live_workers(server), what="every worker to be alive")
    started_workers = server.worker_pids()
    log_before = len(server.log())
    held_name = f"held-{uuid.uuid4().hex}"
    held_key = str(uuid.uuid4())
    held_path = f"/charge/{held_name}"
    headers = {"Idempotency-Key": held_key, "Content-Type": "application/json"}
    hold = server.side_dir / f"{held_name}.hold"
    hold.touch()
    traffic = Traffic(server)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=ANSWER_BOUND) as client:
        held = asyncio.create_task(client.post(held_path, content=BODY, headers=headers))
        try:
            await poll(partial(events, server, held_name), what="the held operation to start")
            traffic.start()
            await poll(lambda: traffic.count(generation=0, status=200, replayed=True) >= 5, what="traffic to flow")

            await asyncio.to_thread(break_store)  # while requests are in flight
            broken_at = time.monotonic()
            traffic.next_generation()
            await traffic.drained(0)
            await poll(lambda: traffic.count(generation=1, status=503) >= 8, what=f"503s while {what}")
            # The operation that was running finishes now: its client still gets its response (which cannot be
            # recorded), and a retry meanwhile is told to come back later.
            hold.unlink()
            async with asyncio.timeout(ANSWER_BOUND):
                held_response = await held
            async with asyncio.timeout(ANSWER_BOUND):
                retry = await client.post(held_path, content=BODY, headers=headers)
            assert retry.status_code == 503, retry.text
            assert retry.headers["content-type"] == "application/problem+json"
            assert retry.json()["type"] == "urn:idempo:problem:store-unavailable"
            assert int(retry.headers["retry-after"]) >= 1

            repaired_at = time.monotonic()
            await asyncio.to_thread(repair_store)
            back_at = time.monotonic()
            traffic.next_generation()
            await poll(
                lambda: (
                    traffic.count(generation=2, status=200, replayed=False) >= 5
                    and traffic.count(generation=2, status=200, replayed=True) >= 5
                ),
                what="new keys to run and replay once the store is back",
            )
        finally:
            hold.unlink(missing_ok=True)
            await traffic.stop()
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)

    statuses = traffic.check()
    assert held_response.status_code == 200, held_response.text
    assert "idempotent-replayed" not in held_response.headers
    held_pid = int(held_response.headers["x-worker-pid"])
    assert events(server, held_name) == [("start", held_pid), ("done", held_pid)]
    down = [e for e in traffic.exchanges if e.sent_at >= broken_at and e.answered_at < repaired_at]
    assert down, statuses
    assert {e.status for e in down} == {503}, [e for e in down if e.status != 503]
    up_again = [e for e in traffic.exchanges if e.sent_at >= back_at]
    assert {e.status for e in up_again} <= {200, 409}, [e for e in up_again if e.status not in (200, 409)]
    # The same processes throughout: nothing crashed, nothing was restarted.
    assert server.process.poll() is None
    assert server.worker_pids() == started_workers
    assert server.live_worker_pids() == workers
    assert {e.pid for e in up_again} <= workers
    log = server.log()[log_before:]
    assert "Traceback" not in log, log
    return Outage(traffic, broken_at, repaired_at, held_key, held_path, held_response)


def _all_live_workers(server: Server) -> Callable[[], frozenset[int]]:
    def probe() -> frozenset[int]:
        live = server.live_worker_pids()
        return live if len(live) >= WORKERS else frozenset()

    return probe
