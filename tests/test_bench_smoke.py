"""``benchmarks/bench.py --quick`` runs, covers every case on every store, and makes the store calls it should.

Timings are never asserted: they depend on the machine. Only that they are there and positive, and the round trips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"

EXPECTED_TRIPS = {
    "no-key": {},
    "fresh-key": {"claim": 1, "complete": 1},
    "replay": {"claim": 1},
}
METHODS = ("claim", "complete", "release", "renew", "get", "delete", "purge_expired")


def run_quick(out: Path) -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-W", "error", str(BENCH), "--quick", "--json", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the quick benchmark took over 60 s; stderr so far: {exc.stderr!r}") from exc
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_quick_benchmark_covers_every_case_and_counts_round_trips(tmp_path: Path) -> None:
    data = run_quick(tmp_path / "bench.json")

    assert data["settings"]["quick"] is True
    rows = {(row["case"], row["store"]): row for row in data["results"]}
    assert set(rows) == {(case, store) for case in EXPECTED_TRIPS for store in ("memory", "sqlite")}
    for (case, store), row in rows.items():
        for name in ("us_per_request", "bare_us_per_request", "ratio"):
            assert row[name] > 0, f"{case} on {store}: {name} = {row[name]!r}"
        assert row["samples_us"], f"{case} on {store}: no samples"
        assert all(sample > 0 for sample in row["samples_us"] + row["bare_samples_us"])
        assert row["verdict"] in {"PASS", "MISS", "-"}
        expected = {method: EXPECTED_TRIPS[case].get(method, 0) for method in METHODS}
        assert row["round_trips"] == expected, f"{case} on {store}"
