"""``benchmarks/proxy.py --quick`` runs, measures every case on both sides, and measured the path it meant to.

Timings are never asserted, only that they are there and positive. The benchmark checks by itself that every answer
was a 201, that a fresh key reached the upstream once per request and a replay never (and exits 1 otherwise); this
test checks that those checks were made, from the counts it reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.processes import run_script

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "proxy.py"
TIMEOUT = 90

pytestmark = pytest.mark.slow


def test_quick_proxy_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    proc = run_script(BENCH, "--quick", "--json", str(out), timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Warning" not in proc.stderr, proc.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["quick"] is True
    assert data["failures"] == []
    rows = {row["case"]: row for row in data["results"]}
    assert set(rows) == {"no-key", "fresh-key", "replay"}
    for case, row in rows.items():
        for side in ("direct", "proxy"):
            measured = row[side]
            assert measured["requests"] > 0, (case, side)
            assert measured["rps"] > 0
            assert 0 < measured["p50_ms"] <= measured["p99_ms"]
        assert row["rps_ratio"] > 0
        assert row["p50_ratio"] > 0
        assert row["direct"]["upstream_calls"] == row["direct"]["requests"]
    assert rows["no-key"]["proxy"]["upstream_calls"] == rows["no-key"]["proxy"]["requests"]
    assert rows["fresh-key"]["proxy"]["upstream_calls"] == rows["fresh-key"]["proxy"]["requests"]
    assert rows["replay"]["proxy"]["upstream_calls"] == 0
    assert rows["replay"]["proxy"]["replayed"] == rows["replay"]["proxy"]["requests"]
    assert rows["fresh-key"]["proxy"]["replayed"] == 0
    assert "ratio: proxy/direct" in proc.stdout
