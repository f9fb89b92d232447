"""``benchmarks/split.py --quick`` runs on every store and prints the split of both cases for idempo and the floor,
whose parts add up to the total. Timings are never asserted beyond that: they depend on the machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.processes import run_script

ROOT = Path(__file__).resolve().parent.parent
SPLIT = ROOT / "benchmarks" / "split.py"
TIMEOUT = 90

pytestmark = pytest.mark.slow


def test_quick_split_on_every_store(redis_url: str, postgres_url: str) -> None:
    env = {**os.environ, "IDEMPO_TEST_REDIS_URL": redis_url, "IDEMPO_TEST_POSTGRES_URL": postgres_url}
    proc = run_script(SPLIT, "--quick", timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Warning" not in proc.stderr, proc.stderr
    assert "skipped" not in proc.stdout, proc.stdout
    rows: dict[tuple[str, str, str], list[float]] = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0] in ("fresh-key", "replay"):
            rows[fields[0], fields[1], fields[2]] = [float(value) for value in fields[3:]]
    for store in ("memory", "sqlite", "redis", "postgres"):
        for case in ("fresh-key", "replay"):
            sides = {side: rows[case, store, side] for side in ("idempo", "floor")}
            for side, (total, app, callbacks, around) in sides.items():
                assert total > 0, (case, store, side)
                assert app + callbacks + around == pytest.approx(total, abs=0.2), (case, store, side)
                if case == "replay":  # the app never runs on a replay: all of it is around
                    assert app == callbacks == 0.0, (case, store, side)
                else:
                    assert app > 0, (case, store, side)
                    assert callbacks > 0, (case, store, side)
            excess = rows[case, store, "excess"]
            expected = [a - b for a, b in zip(sides["idempo"], sides["floor"], strict=True)]
            assert excess == pytest.approx(expected, abs=0.2), (case, store)
