"""``benchmarks/compare.py`` runs: every contestant it has answers a fresh key and replays it, and gets a ratio in
both cases. Timings are never asserted. The published packages it compares are not in the project's environment
(``make bench-compare`` installs them apart), so here they are reported as left out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "benchmarks" / "compare.py"
OWN = ("idempo", "floor", "+ key, principal, fingerprint", "+ keep rules, encoding", "+ fenced store", "+ state, lease")


def test_compare_checks_every_contestant_and_prints_both_ratios() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(COMPARE), "--reps", "1", "-n", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    checks, _, table = proc.stdout.partition("\ncontestant")
    for label in OWN:
        # The check: 200 to a fresh key, then 200 with the replay header to the same key again.
        assert re.search(rf"^  {re.escape(label)} +200, then 200 \(idempotent-replayed: true\)$", checks, re.M), checks
        # The table: one positive ratio per case.
        row = re.search(rf"^{re.escape(label)} +([0-9.]+)x +([0-9.]+)x$", table, re.M)
        assert row is not None, table
        assert float(row[1]) > 0
        assert float(row[2]) > 0
    for package in ("fastapi-idempotency-key", "asgi-idempotency-header", "fastapi-idempotency"):
        installed = re.search(rf"^  {package} +200", checks, re.M)
        left_out = re.search(rf"^  left out: {package}: not installed", checks, re.M)
        assert installed or left_out, checks
