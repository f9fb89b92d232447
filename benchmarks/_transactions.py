"""The transactional part of ``bench.py``: a keyed request whose response is recorded inside the handler's own
database transaction (:mod:`idempo.transactions`), against the same handler without idempo and with the plain
middleware, on PostgreSQL and SQLite, in the same run.

The handler is a FastAPI endpoint that opens a SQLAlchemy ``AsyncSession`` transaction (``postgresql+psycopg``;
``sqlite+aiosqlite`` on a file), inserts one ledger row and commits. Three variants of it, on the same database:

``bare``
    no idempo.
``plain``
    behind :class:`~idempo.IdempotencyMiddleware` on ``store_for(engine)`` (the store's table in the same database);
    the handler unchanged. A new key: the claim, the handler's transaction, then the middleware's completion, each
    a transaction of its own.
``bound``
    the same middleware, and the handler calls ``await record_async(session, response)`` just before its commit:
    the store's fenced completion runs inside the handler's transaction, and the middleware, which sees the commit,
    makes no store call after the handler.

Cases ``fresh-key`` (a new key every time) and ``replay`` (one key again and again: the middleware answers from
the store and the handler does not run; the bare handler, which knows no keys, runs its transaction every time).

Theory of operation: as for the ASGI cases (see ``bench.py``'s docstring), the app is called directly with scopes
as uvicorn builds them, one loop turn after each request. The three variants take turns in blocks of requests
within each repetition, after one ``gc.collect()``, in an order that changes between repetitions: a block runs
colder after a variant that waits on the database, so each variant follows each of the others in as many
repetitions, and starts in as many. The figures are the median over the repetitions of µs per request, and the
median of the repetitions' ratios to ``bare``.

What a request does is counted in a separate, untimed pass, on apps built the same way but watched: the store calls
(an :class:`~idempo.observe.Observer`'s ``on_store_call``), the handler's SQL statements and commits (SQLAlchemy's
``before_cursor_execute`` and ``commit`` events), and, on PostgreSQL, the round trips and transactions on the wire:
that pass reaches the server through a relay that reads the server's messages and counts its ``ReadyForQuery``
(one per round trip, whoever sent it, the store or the handler) and those of them that end a transaction (status
idle: a ``COMMIT``, or a statement in autocommit, as every store call is). The wire counts shown are those of most
requests: a connection's first uses of a statement (psycopg prepares it) add a round trip once; the JSON keeps how
many requests saw each count. The pass also checks what each variant answers (200, the same body,
``Idempotent-Replayed: true`` on a replay) and the ledger rows it adds (one per request run, none per replay).

The SQLite app's connections use the store's settings (WAL, ``synchronous=NORMAL``), so that its commits and the
store's cost the same. On PostgreSQL the run keeps its rows in tables of its own (``idempo_bench_<random>_ledger``
and ``..._records``), dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
import statistics
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from _apps import LEASE, PATH, TTL, KeyFactory, call, make_requests
from _harness import CaseResult, Settings, time_block
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from idempo import IdempotencyMiddleware, Store
from idempo.asgi import ASGIApp
from idempo.observe import Outcome, StoreOperation
from idempo.stores import parse_store_url
from idempo.transactions import record_async, store_for

__all__ = ["TX_CASES", "TX_STORES", "VARIANTS", "TxResult", "bench_transactions", "format_transactions"]

TX_STORES: Final = ("sqlite", "postgres")
TX_CASES: Final = ("fresh-key", "replay")
VARIANTS: Final = ("bare", "plain", "bound")
# The orders of the variants' blocks, one per repetition in turn. Blocks cycle, so what matters is which variant a
# block follows: half the orders cycle bare, plain, bound and half the other way round; each variant starts as often.
ORDERS: Final = (
    ("bare", "plain", "bound"),
    ("bound", "plain", "bare"),
    ("plain", "bound", "bare"),
    ("bare", "bound", "plain"),
    ("bound", "bare", "plain"),
    ("plain", "bare", "bound"),
)
_CHECK_REQUESTS: Final = 20
_BLOCK: Final = 20  # requests per block at most: a request costs milliseconds here, and the variants take turns often
_WARMUP: Final = 60  # requests per variant at most before a case is calibrated
_BUDGET: Final = 2  # times the ASGI cases' budget per repetition: requests of milliseconds, three variants
_ANSWER: Final = {"id": 42, "status": "created"}


@dataclass
class TxResult:
    """One variant of one case on one store: its timings, and what one request does (counted)."""

    case: str
    store: str
    variant: str
    n: int = 0
    samples_us: list[float] = field(default_factory=list)
    bare_samples_us: list[float] = field(default_factory=list)
    us_per_request: float = 0.0
    ratio: float = 0.0
    store_calls: dict[str, float] = field(default_factory=dict)
    statements: dict[str, float] = field(default_factory=dict)  # the handler's, by their first word
    app_commits: float = 0.0
    # PostgreSQL, on the wire, the store's and the handler's: the round trips and the transactions ended (a COMMIT,
    # or a statement in autocommit) of most requests, and how many requests saw each count.
    round_trips: int | None = None
    transactions: int | None = None
    wire_seen: dict[str, int] = field(default_factory=dict)

    def summarize(self) -> None:
        self.us_per_request = statistics.median(self.samples_us)
        self.ratio = statistics.median(v / b for v, b in zip(self.samples_us, self.bare_samples_us, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "store": self.store,
            "variant": self.variant,
            "n": self.n,
            "us_per_request": self.us_per_request,
            "ratio": self.ratio,
            "ratios": [v / b for v, b in zip(self.samples_us, self.bare_samples_us, strict=True)],
            "samples_us": self.samples_us,
            "store_calls": self.store_calls,
            "statements": self.statements,
            "app_commits": self.app_commits,
            "round_trips": self.round_trips,
            "transactions": self.transactions,
            "wire_seen": self.wire_seen,
        }


# -- counting ---------------------------------------------------------------------------------------------------


class CountingObserver:
    """An :class:`~idempo.observe.Observer` that counts the middleware's store calls and outcomes."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def on_request(self, outcome: Outcome, scope: Any) -> None:
        self.outcomes[outcome] += 1

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        if error is not None:
            msg = f"the store failed on {operation}: {error!r}"
            raise RuntimeError(msg)
        self.calls[operation] += 1


class StatementCounter:
    """The SQL statements and the commits of an engine's connections (the handler's), by SQLAlchemy's events."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.statements: Counter[str] = Counter()
        self.commits = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._statement)
        event.listen(engine.sync_engine, "commit", self._commit)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements[statement.split(None, 1)[0].upper()] += 1

    def _commit(self, conn: Any) -> None:
        self.commits += 1


class WireCounter:
    """A TCP relay to PostgreSQL that counts, in the server's messages, every ``ReadyForQuery`` after the start-up
    of a connection (one per round trip) and those with the status idle (a transaction ended). The clients must
    connect without TLS or GSS encryption (``sslmode=disable``, ``gssencmode=disable``), so that the stream can
    be read."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.round_trips = 0
        self.transactions = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1; returns it."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self.host, self.port)
        self.connections += 1
        tasks = {
            asyncio.create_task(self._copy(client_reader, server_writer)),
            asyncio.create_task(self._count(server_reader, client_writer)),
        }
        self._tasks |= tasks
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._tasks -= tasks
            for writer in (client_writer, server_writer):
                writer.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward the server's messages (a type byte, then their length, itself included), counting."""
        started = False  # the first ReadyForQuery ends the connection's start-up: no request's round trip
        buffer = b""
        while data := await reader.read(65536):
            writer.write(data)
            buffer += data
            at = 0
            while len(buffer) - at >= 5:
                kind = buffer[at : at + 1]
                (length,) = struct.unpack_from("!i", buffer, at + 1)
                if len(buffer) - at < 1 + length:
                    break
                if kind == b"Z":
                    if started:
                        self.round_trips += 1
                        self.transactions += buffer[at + 5 : at + 6] == b"I"
                    started = True
                at += 1 + length
            buffer = buffer[at:]
            await writer.drain()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()


# -- the application --------------------------------------------------------------------------------------------


def make_ledger(name: str) -> Table:
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("item", String(40), nullable=False),
        Column("quantity", Integer, nullable=False),
    )


def make_tx_app(sessions: async_sessionmaker[AsyncSession], ledger: Table, *, bound: bool) -> FastAPI:
    """The endpoint: one ledger row, in a transaction of its own; with *bound*, the response recorded in it."""
    app = FastAPI()

    @app.post(PATH)
    async def create_order() -> JSONResponse:
        async with sessions.begin() as session:
            await session.execute(insert(ledger).values(item="widget", quantity=3))
            response = JSONResponse(_ANSWER)
            if bound and not await record_async(session, response):
                msg = "record_async did not record the response"
                raise RuntimeError(msg)
        return response

    return app


class Rig:
    """The three variants on one database: its engine, the store on it, and the apps; watched for the counting
    pass, or not (the timed one)."""

    def __init__(self, url: URL, ledger: Table, store_options: Mapping[str, Any], *, watched: bool) -> None:
        self.url = url
        self.ledger = ledger
        self.engine = create_async_engine(url)
        if url.get_backend_name() == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_settings)
        self.store: Store = store_for(self.engine, **store_options)  # type: ignore[assignment]  # async: AsyncEngine
        self.observer = CountingObserver() if watched else None
        self.statements = StatementCounter(self.engine) if watched else None
        sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.apps: dict[str, ASGIApp] = {
            "bare": make_tx_app(sessions, ledger, bound=False),
            "plain": self._wrap(make_tx_app(sessions, ledger, bound=False)),
            "bound": self._wrap(make_tx_app(sessions, ledger, bound=True)),
        }

    def _wrap(self, app: ASGIApp) -> IdempotencyMiddleware:
        return IdempotencyMiddleware(app, store=self.store, ttl=TTL, lease=LEASE, observer=self.observer)

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.ledger.metadata.create_all)

    async def rows(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(self.ledger))).scalar_one())

    async def aclose(self, *, drop: Iterable[str] = ()) -> None:
        try:
            await self.store.close()
            if drop:
                async with self.engine.begin() as conn:
                    for table in drop:
                        await conn.execute(text(f'DROP TABLE IF EXISTS "{table}"'))
        finally:
            await self.engine.dispose()


def _sqlite_settings(dbapi_connection: Any, connection_record: Any) -> None:
    """The app's SQLite connections as the store's: WAL, commits that do not wait for the disk, a busy timeout."""
    cursor = dbapi_connection.cursor()
    try:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000"):
            cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def label(store: str, variant: str) -> str:
    """What the replay case's key is made from: one completed key per store and variant."""
    return f"tx-{store}-{variant}"


# -- timing -----------------------------------------------------------------------------------------------------


async def time_rep(
    apps: Mapping[str, ASGIApp], case: str, store: str, n: int, block: int, keys: KeyFactory, *, rep: int = 0
) -> dict[str, float]:
    """One repetition: *n* requests through each variant, in blocks that take turns in the *rep*-th order of
    :data:`ORDERS`; one short untimed block of each before, after a ``gc.collect()``. Returns µs per request by
    variant."""
    order = ORDERS[rep % len(ORDERS)]
    requests = {variant: make_requests(case, label(store, variant), n, keys) for variant in order}
    settling = {variant: make_requests(case, label(store, variant), min(block, 10), keys) for variant in order}
    elapsed = dict.fromkeys(order, 0)
    gc.collect()
    for variant in order:
        await time_block(apps[variant], settling[variant])
    for at in range(0, n, block):
        for variant in order:
            elapsed[variant] += await time_block(apps[variant], requests[variant][at : at + block])
    return {variant: ns / n / 1000 for variant, ns in elapsed.items()}


async def count_case(rig: Rig, wire: WireCounter | None, store: str, case: str, keys: KeyFactory) -> list[TxResult]:
    """What one request of *case* does through each variant (counted, untimed), and whether it answers right."""
    observer, statements = rig.observer, rig.statements
    assert observer is not None
    assert statements is not None
    results = []
    for variant in VARIANTS:
        app = rig.apps[variant]
        # First a few untimed: connections opened, and statements prepared (psycopg prepares at the 5th execution).
        for request in make_requests(case, label(store, variant), 10, keys):
            await call(app, request)
        observer.calls.clear()
        rows = await rig.rows()
        statements.statements.clear()
        statements.commits = 0
        seen: list[tuple[int, int]] = []  # on the wire, per request: round trips, transactions
        for request in make_requests(case, label(store, variant), _CHECK_REQUESTS, keys):
            before = (wire.round_trips, wire.transactions) if wire is not None else (0, 0)
            status, headers, body = await call(app, request)
            if wire is not None:
                seen.append((wire.round_trips - before[0], wire.transactions - before[1]))
            replayed = headers.get(b"idempotent-replayed") == b"true"
            if (
                status != 200
                or body != b'{"id":42,"status":"created"}'
                or replayed != (case == "replay" and variant != "bare")
            ):
                msg = f"{variant} {case} on {store}: answered {status} {headers!r} {body!r}: the wrong path"
                raise RuntimeError(msg)
        result = TxResult(case, store, variant)
        result.store_calls = {op: count / _CHECK_REQUESTS for op, count in sorted(observer.calls.items())}
        result.statements = {verb: count / _CHECK_REQUESTS for verb, count in sorted(statements.statements.items())}
        result.app_commits = statements.commits / _CHECK_REQUESTS
        if seen:  # the most common count: a connection's first use of a statement adds a round trip, once
            result.round_trips, result.transactions = statistics.mode(seen)
            result.wire_seen = {
                f"{trips} round trips, {ended} transactions": n for (trips, ended), n in Counter(seen).items()
            }
        added = await rig.rows() - rows
        expected = 0 if case == "replay" and variant != "bare" else _CHECK_REQUESTS
        if added != expected:
            msg = f"{variant} {case} on {store}: {added} ledger rows for {_CHECK_REQUESTS} requests, not {expected}"
            raise RuntimeError(msg)
        results.append(result)
    bound = next(r for r in results if r.variant == "bound")
    if case == "fresh-key" and bound.store_calls != {"claim": 1.0}:
        msg = f"bound fresh-key on {store}: store calls {bound.store_calls}, not the claim alone"
        raise RuntimeError(msg)
    return results


# -- the run ----------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _database(
    store: str, tmp: Path, postgres_url: str, log: Callable[[str], None]
) -> AsyncIterator[tuple[Rig, Rig, WireCounter | None, list[str]]]:
    """The timed rig and the watched one on *store*'s database, and the relay the watched one's PostgreSQL
    connections go through; at the end, what the run made on the server is dropped."""
    if store == "sqlite":
        ledger = make_ledger("ledger")
        timed = Rig(make_url(f"sqlite+aiosqlite:///{tmp / 'tx.db'}"), ledger, {}, watched=False)
        watched = Rig(make_url(f"sqlite+aiosqlite:///{tmp / 'tx-check.db'}"), ledger, {}, watched=True)
        try:
            yield timed, watched, None, []
        finally:
            await asyncio.gather(timed.aclose(), watched.aclose())
        return
    tag = secrets.token_hex(6)
    ledger, records = make_ledger(f"idempo_bench_{tag}_ledger"), f"idempo_bench_{tag}_records"
    from idempo.stores.postgres import _strip_options

    url = make_url(_strip_options(parse_store_url(postgres_url))).set(drivername="postgresql+psycopg")
    wire = None
    watched_url = url
    if url.host and not url.host.startswith("/"):
        wire = WireCounter(url.host, url.port or 5432)
        port = await wire.start()
        query = {**url.query, "sslmode": "disable", "gssencmode": "disable"}
        watched_url = url.set(host="127.0.0.1", port=port, query=query)
    options = {"table": records}
    timed = Rig(url, ledger, options, watched=False)
    watched = Rig(watched_url, ledger, options, watched=True)
    try:
        yield timed, watched, wire, [ledger.name, records]
    finally:
        try:
            await watched.aclose()
            await timed.aclose(drop=(ledger.name, records))
            log(f"  transactions postgres: tables {ledger.name} and {records} dropped at the end")
        finally:
            if wire is not None:
                await wire.aclose()


async def bench_transactions(
    store: str, tmp: Path, postgres_url: str, settings: Settings, keys: KeyFactory, log: Callable[[str], None]
) -> tuple[list[TxResult], list[str]]:
    """The three variants of each case on *store* (``sqlite``: a file in *tmp*; ``postgres``: at *postgres_url*), and
    the tables the run made on the PostgreSQL server (dropped at the end)."""
    block = min(settings.block, _BLOCK)
    async with _database(store, tmp, postgres_url, log) as (timed, watched, wire, tables):
        results: list[TxResult] = []
        for rig in (timed, watched):
            await rig.create()
            for variant in ("plain", "bound"):  # the replay keys, completed by each variant
                status, _, _ = await call(rig.apps[variant], make_requests("replay", label(store, variant), 1, keys)[0])
                if status != 200:
                    msg = f"seeding the {variant} replay key on {store} answered {status}"
                    raise RuntimeError(msg)
        sizes = []
        for case in TX_CASES:
            counted = await count_case(watched, wire, store, case, keys)
            warmup = min(settings.warmup, _WARMUP)
            await time_rep(timed.apps, case, store, max(block, warmup // block * block), block, keys)
            n = settings.n
            if n is None:
                trial = await time_rep(timed.apps, case, store, block, block, keys)
                n = int(_BUDGET * settings.budget_ms * 1000 / sum(trial.values())) // block * block
                n = max(2 * block, min(settings.max_n, n))
            sizes.append(f"{case} {n}")
            for result in counted:
                result.n = n
            by_variant = {r.variant: r for r in counted}
            for rep in range(settings.reps):
                us = await time_rep(timed.apps, case, store, n, block, keys, rep=rep)
                for variant, result in by_variant.items():
                    result.samples_us.append(us[variant])
                    result.bare_samples_us.append(us["bare"])
            for result in counted:
                result.summarize()
            results.extend(counted)
        log(f"  transactions {store}: N per case: {', '.join(sizes)}; {settings.reps} repetitions")
        return results, tables


# -- the report -------------------------------------------------------------------------------------------------


def _calls(counts: Mapping[str, float]) -> str:
    return " ".join(f"{name}={count:g}" for name, count in counts.items() if count) or "none"


def format_transactions(asgi: Iterable[CaseResult], results: Sequence[TxResult]) -> str:
    """The three variants of each case; then, per store, bound against plain on a fresh key, beside what the
    middleware adds to the trivial endpoint's fresh key in the ASGI table."""
    header = (
        f"{'case':<10} {'store':<8} {'variant':<7} │ {'µs/req':>8} {'ratio':>6} {'+µs':>7} │ "
        f"{'store calls/req':<19} {'app SQL/req':<18} {'app commits':>11} {'round trips':>11} {'transactions':>12}"
    )
    lines = [
        "The response recorded in the handler's transaction (idempo.transactions), same run. The handler inserts a",
        "ledger row in an AsyncSession transaction. bare: no idempo; plain: IdempotencyMiddleware on",
        "store_for(engine), the handler unchanged; bound: the same, and record_async(session, response) before the",
        "commit. ratio: to bare; +µs: minus bare. Counted per request: the middleware's store calls, the handler's SQL",
        "statements and commits, and on PostgreSQL the round trips and transactions on the wire (store and handler).",
        header,
        "-" * len(header),
    ]
    bare = {(r.case, r.store): r.us_per_request for r in results if r.variant == "bare"}
    for r in results:
        trips = f"{r.round_trips:g}" if r.round_trips is not None else "-"
        transactions = f"{r.transactions:g}" if r.transactions is not None else "-"
        plus = f"{r.us_per_request - bare[r.case, r.store]:>7.1f}" if r.variant != "bare" else f"{'':>7}"
        lines.append(
            f"{r.case:<10} {r.store:<8} {r.variant:<7} │ {r.us_per_request:>8.1f} {r.ratio:>5.2f}x {plus} │ "
            f"{_calls(r.store_calls):<19} {_calls(r.statements):<18} {r.app_commits:>11g} {trips:>11} "
            f"{transactions:>12}"
        )
    by_asgi = {(r.case, r.store): r for r in asgi}
    for store in dict.fromkeys(r.store for r in results):
        variants = {r.variant: r for r in results if r.store == store and r.case == "fresh-key"}
        plain, bound = variants.get("plain"), variants.get("bound")
        if plain is None or bound is None:
            continue
        line = f"{store}, a fresh key: bound - plain = {bound.us_per_request - plain.us_per_request:+.1f} µs"
        if plain.round_trips is not None and bound.round_trips is not None:
            line += f"; round trips {bound.round_trips:g} and {plain.round_trips:g}"
            line += f", transactions {bound.transactions:g} and {plain.transactions:g}"
        trivial = by_asgi.get(("fresh-key", store))
        if trivial is not None:
            added = trivial.us_per_request - trivial.bare_us_per_request
            line += f". The middleware on the trivial endpoint (ASGI table): +{added:.1f} µs"
        lines.append(line)
    return "\n".join(lines)
