"""The unit tests of idempo.js (``tests/js/``), run by Node's own test runner: ``node --test``, no npm package.

Without Node they skip and say what to install; under ``CI=true`` they fail instead (``make test`` runs
``scripts/browser``, which installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.environment import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
JS_TESTS = sorted((REPO / "tests" / "js").glob("*.test.mjs"))


@pytest.mark.timeout(120)
def test_idempo_js_unit_tests_pass() -> None:
    """``node --test tests/js/`` passes, and ran at least one test."""
    node = shutil.which("node")
    if node is None:
        skip_or_fail("Node.js is not installed: run 'scripts/browser' (or 'apt-get install nodejs')")
    assert JS_TESTS, "no tests/js/*.test.mjs"
    # The files by name rather than the directory: newer Node versions read --test arguments as glob patterns.
    result = subprocess.run(
        [node, "--test", *map(str, JS_TESTS)], cwd=REPO, capture_output=True, text=True, timeout=100, check=False
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    summary = dict(line[2:].split(" ", 1) for line in report.splitlines() if line.startswith("# ") and " " in line[2:])
    assert int(summary.get("pass", "0")) > 0, report
    assert summary.get("fail") == "0", report
