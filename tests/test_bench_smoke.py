"""``benchmarks/bench.py --quick`` runs, covers every case on every store (and the WSGI middleware's on memory and
SQLite, and the response recorded in the handler's transaction on SQLite and PostgreSQL), and makes the store calls
it should; the floor (``benchmarks/floor.py``) runs beside idempo on every store, one store round trip per replay and
two per fresh key.

Timings are never asserted: they depend on the machine. Only that they are there and positive, and the round trips.
The Redis and PostgreSQL runs need their servers (``redis_url``, ``postgres_url``: skipped locally without them,
failed under ``CI=true``), and must leave nothing behind on them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import redis

from tests.support.processes import run_script

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
TIMEOUT = 90

EXPECTED_TRIPS = {
    "no-key": {},
    "fresh-key": {"claim": 1, "complete": 1},
    "replay": {"claim": 1},
    "fresh-key-1k": {"claim": 1, "complete": 1},
    "replay-cached": {},
}
# The floor's store round trips per request (its backend's calls): one to claim or read, one to record.
FLOOR_EXPECTED_TRIPS = {
    "no-key": {"claim": 0, "record": 0},
    "fresh-key": {"claim": 1, "record": 1},
    "replay": {"claim": 1, "record": 0},
    "fresh-key-1k": {"claim": 1, "record": 1},
}
METHODS = ("claim", "complete", "release", "renew", "get", "delete", "purge_expired")


def run_bench(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_script(BENCH, "--quick", *args, timeout=TIMEOUT, env=env)


def run_quick(out: Path, *args: str) -> dict[str, Any]:
    proc = run_bench("--json", str(out), *args)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    # Unclosed clients and sockets show up as warnings the interpreter can only print.
    assert "Warning" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["settings"]["quick"] is True
    return data


def check_rows(data: dict[str, Any], stores: tuple[str, ...]) -> None:
    rows = {(row["case"], row["store"]): row for row in data["results"]}
    assert set(rows) == {(case, store) for case in EXPECTED_TRIPS for store in stores}
    for (case, store), row in rows.items():
        for name in ("us_per_request", "bare_us_per_request", "ratio"):
            assert row[name] > 0, f"{case} on {store}: {name} = {row[name]!r}"
        assert row["samples_us"], f"{case} on {store}: no samples"
        assert all(sample > 0 for sample in row["samples_us"] + row["bare_samples_us"])
        assert row["verdict"] in {"PASS", "MISS", "-"}
        expected = {method: EXPECTED_TRIPS[case].get(method, 0) for method in METHODS}
        assert row["round_trips"] == expected, f"{case} on {store}"
        # The store calls were also timed alone, for the cases that make some.
        assert set(row["split_us"]) == {"app", "store_calls", "server_ops", "remainder"}
        assert (row["split_us"]["store_calls"] > 0) == bool(EXPECTED_TRIPS[case]), f"{case} on {store}"
        assert len(row["store_calls_samples_us"]) == (len(row["samples_us"]) if EXPECTED_TRIPS[case] else 0)


def check_floor_rows(data: dict[str, Any], stores: tuple[str, ...]) -> None:
    """The floor, timed in the same blocks as idempo: its times, its ratios and verdicts, and its round trips."""
    assert data["floor"]["skipped"] == {}
    assert set(data["floor"]["clients"]) == set(stores)
    idempo = {(row["case"], row["store"]): row for row in data["results"]}
    rows = {(row["case"], row["store"]): row for row in data["floor_results"]}
    assert set(rows) == {(case, store) for case in FLOOR_EXPECTED_TRIPS for store in stores}
    for (case, store), row in rows.items():
        assert row["round_trips"] == FLOOR_EXPECTED_TRIPS[case], f"the floor's {case} on {store}"
        assert row["us_per_request"] > 0, f"the floor's {case} on {store}"
        assert len(row["samples_us"]) == len(idempo[case, store]["samples_us"])
        assert all(sample > 0 for sample in row["samples_us"] + row["ratios"] + row["idempo_ratios"])
        assert row["ratio"] > 0
        assert row["idempo_ratio"] > 0
        assert row["idempo_us_per_request"] == idempo[case, store]["us_per_request"]
        assert row["target"] == 1.15
        assert row["verdict"] == ("PASS" if row["idempo_ratio"] <= 1.15 else "MISS")


WSGI_EXPECTED_TRIPS = {case: EXPECTED_TRIPS[case] for case in ("no-key", "fresh-key", "replay")}


def check_wsgi_rows(data: dict[str, Any], stores: tuple[str, ...]) -> None:
    """The WSGI middleware's cases, timed in the same run: bare and wrapped, and the store calls they made."""
    rows = {(row["case"], row["store"]): row for row in data["wsgi_results"]}
    assert set(rows) == {(case, store) for case in WSGI_EXPECTED_TRIPS for store in stores}
    for (case, store), row in rows.items():
        for name in ("us_per_request", "bare_us_per_request", "ratio"):
            assert row[name] > 0, f"WSGI {case} on {store}: {name} = {row[name]!r}"
        assert row["samples_us"], f"WSGI {case} on {store}: no samples"
        assert all(sample > 0 for sample in row["samples_us"] + row["bare_samples_us"])
        expected = {method: WSGI_EXPECTED_TRIPS[case].get(method, 0) for method in METHODS}
        assert row["round_trips"] == expected, f"WSGI {case} on {store}"
        assert (row["verdict"] in {"PASS", "MISS"}) == (case == "no-key"), f"WSGI {case} on {store}: a target?"


# A handler's transaction, per case and variant: the middleware's store calls, the handler's statements and commits,
# and on PostgreSQL the round trips and the transactions ended, on the wire (the store's and the handler's).
TX_EXPECTED: dict[tuple[str, str], tuple[dict[str, float], dict[str, float], float, int, int]] = {
    ("fresh-key", "bare"): ({}, {"INSERT": 1}, 1, 3, 1),
    ("fresh-key", "plain"): ({"claim": 1, "complete": 1}, {"INSERT": 1}, 1, 5, 3),
    # The completion is one more statement in the handler's transaction: no store call, no commit of its own.
    ("fresh-key", "bound"): ({"claim": 1}, {"INSERT": 1, "UPDATE": 1}, 1, 5, 2),
    ("replay", "bare"): ({}, {"INSERT": 1}, 1, 3, 1),
    ("replay", "plain"): ({"claim": 1}, {}, 0, 1, 1),
    ("replay", "bound"): ({"claim": 1}, {}, 0, 1, 1),
}


def check_transaction_rows(data: dict[str, Any], stores: tuple[str, ...]) -> None:
    """The three variants of the transactional handler, timed in the same run, and what one request of each did."""
    rows = {(row["case"], row["store"], row["variant"]): row for row in data["transaction_results"]}
    assert set(rows) == {(case, store, variant) for case, variant in TX_EXPECTED for store in stores}
    for (case, store, variant), row in rows.items():
        assert row["us_per_request"] > 0, f"{variant} {case} on {store}"
        assert row["samples_us"], f"{variant} {case} on {store}: no samples"
        assert all(sample > 0 for sample in row["samples_us"] + row["ratios"])
        assert (row["ratio"] == 1) == (variant == "bare"), f"{variant} {case} on {store}: ratio {row['ratio']}"
        calls, statements, commits, trips, transactions = TX_EXPECTED[case, variant]
        assert row["store_calls"] == calls, f"{variant} {case} on {store}"
        assert row["statements"] == statements, f"{variant} {case} on {store}"
        assert row["app_commits"] == commits, f"{variant} {case} on {store}"
        if store == "postgres":
            assert (row["round_trips"], row["transactions"]) == (trips, transactions), f"{variant} {case}"
        else:
            assert (row["round_trips"], row["transactions"]) == (None, None), f"{variant} {case} on {store}"


def check_server(data: dict[str, Any], store: str, op: str) -> dict[str, Any]:
    """The server's bare operation was timed, and its share of the requests computed from the counted trips."""
    server: dict[str, Any] = data["servers"][store]
    assert server["op"] == op
    assert server["us_per_op"] > 0
    assert server["samples_us"]
    assert all(sample > 0 for sample in server["samples_us"])
    for row in data["results"]:
        trips = sum(row["round_trips"].values())
        assert row["split_us"]["server_ops"] == trips * server["us_per_op"], row["case"]
    assert data["skipped"] == {}
    return server


def test_quick_benchmark_covers_every_case_and_counts_round_trips(tmp_path: Path) -> None:
    data = run_quick(tmp_path / "bench.json", "--stores", "memory,sqlite")

    check_rows(data, ("memory", "sqlite"))
    check_floor_rows(data, ("memory", "sqlite"))
    check_wsgi_rows(data, ("memory", "sqlite"))
    check_transaction_rows(data, ("sqlite",))
    assert data["transaction_tables"] == []
    assert data["servers"] == {}
    assert data["skipped"] == {}


def test_quick_benchmark_on_redis_counts_round_trips_and_leaves_no_keys(tmp_path: Path, redis_url: str) -> None:
    data = run_quick(tmp_path / "bench.json", "--stores", "redis", "--redis-url", redis_url, "--require-services")

    check_rows(data, ("redis",))
    check_floor_rows(data, ("redis",))
    assert data["wsgi_results"] == []  # the WSGI cases run on memory and SQLite only
    assert data["transaction_results"] == []  # and the transactional ones on SQLite and PostgreSQL
    server = check_server(data, "redis", "PING")
    prefix = server["prefix"]
    assert prefix.startswith("idempo-bench-")
    client = redis.Redis.from_url(redis_url)
    try:
        left = list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()
    assert left == [], f"the benchmark left {len(left)} keys under {prefix!r}"


def test_quick_benchmark_on_postgres_counts_round_trips_and_drops_its_table(tmp_path: Path, postgres_url: str) -> None:
    data = run_quick(
        tmp_path / "bench.json", "--stores", "postgres", "--postgres-url", postgres_url, "--require-services"
    )

    check_rows(data, ("postgres",))
    check_floor_rows(data, ("postgres",))
    check_transaction_rows(data, ("postgres",))
    server = check_server(data, "postgres", "SELECT 1")
    tables = [server["table"], server["floor_table"], *data["transaction_tables"]]
    assert len(tables) == 4
    assert all(table.startswith("idempo_bench_") for table in tables)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for table in tables:
            row = conn.execute("SELECT to_regclass(%s) IS NULL", [table]).fetchone()
            assert row == (True,), f"the benchmark left its table {table}"


def _closed_port() -> int:
    """A port of 127.0.0.1 where nothing listens (one the system just handed out, and closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_server_that_does_not_answer_is_skipped_with_a_note_unless_required(tmp_path: Path) -> None:
    port = _closed_port()
    urls = ["--redis-url", f"redis://127.0.0.1:{port}/0", "--postgres-url", f"postgresql://postgres@127.0.0.1:{port}/t"]
    local = {name: value for name, value in os.environ.items() if name != "CI"}
    out = tmp_path / "bench.json"

    skipped = run_bench("--stores", "redis,postgres", *urls, "--json", str(out), env=local)
    assert skipped.returncode == 0, skipped.stderr
    for store in ("redis", "postgres"):
        assert f"note: {store} skipped (not reachable at " in skipped.stdout
    data = json.loads(out.read_text())
    assert set(data["skipped"]) == {"redis", "postgres"}
    assert data["results"] == []

    required = run_bench("--stores", "redis", *urls, "--require-services", env=local)
    assert required.returncode == 2
    assert "error: redis: not reachable at " in required.stderr

    in_ci = run_bench("--stores", "postgres", *urls, env={**local, "CI": "true"})
    assert in_ci.returncode == 2
    assert "error: postgres: not reachable at " in in_ci.stderr
    assert "CI=true" in in_ci.stderr


def test_the_load_run_drives_real_uvicorn_workers_and_writes_its_table_and_chart(tmp_path: Path) -> None:
    """``benchmarks/load.py --quick`` on SQLite with one uvicorn worker: bare, idempo and the floor served every
    request of both cases without an error, and the JSON and the chart were written (the load from this process, so
    that the test needs no wrk)."""
    out, chart = tmp_path / "load.json", tmp_path / "load.png"
    args = ["--quick", "--stores", "sqlite", "--workers", "1", "--generator", "python"]
    load = ROOT / "benchmarks" / "load.py"
    proc = run_script(
        load, *args, "--json", str(out), "--chart", str(chart), timeout=TIMEOUT, warnings_are_errors=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert data["failures"] == []
    rows = {(row["store"], row["workers"], row["case"]): row for row in data["results"]}
    assert set(rows) == {("sqlite", 1, "fresh-key"), ("sqlite", 1, "replay")}
    for row in rows.values():
        for variant in ("bare", "idempo", "floor"):
            rounds = row[variant]["rounds"]
            assert rounds, f"{row['case']}: no round of {variant}"
            assert all(r["requests"] > 0 and r["errors"] == 0 for r in rounds), (variant, rounds)
        assert row["floor_over_idempo"] > 0
        assert row["verdict"] in {"PASS", "MISS"}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
