"""``benchmarks/instructions.py`` (``make bench-instructions``): every child serves its requests through every side,
on memory, Redis (a private server, ``--redis-server``) and PostgreSQL, the parent turns the counts into instructions
per request with the requests' own building taken away, and nothing is left on the shared server.

The counts are a stand-in's (``tests/support/fake_counter.py``: a known number per request), so that the test needs
no valgrind and knows what the table must say. valgrind itself is the tool's (``make bench-instructions`` installs
it); the children and the private server run as they do under it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support.processes import run_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "instructions.py"
COUNTER = ROOT / "tests" / "support" / "fake_counter.py"
TIMEOUT = 120
STORES = ("memory", "redis", "postgres")

pytestmark = pytest.mark.slow


def test_every_side_counted_per_request_and_nothing_left_behind(redis_url: str, postgres_url: str) -> None:
    env = {**os.environ, "IDEMPO_TEST_REDIS_URL": redis_url, "IDEMPO_TEST_POSTGRES_URL": postgres_url}
    args = ["--quick", "--stores", ",".join(STORES), "--cases", "replay", "--redis-server"]
    proc = run_script(SCRIPT, *args, "--counter", f"{sys.executable} {COUNTER}", timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = {fields[1]: fields[2:] for fields in map(str.split, proc.stdout.splitlines()) if fields[:1] == ["replay"]}
    assert set(rows) == set(STORES)
    for store, fields in rows.items():
        # The stand-in's 50, 30 and 10 per request: idempo 50 - 10, the floor 30 - 10, whatever N.
        assert fields[:4] == ["40", "20", "+20", "2.00x"], (store, fields)
    # The private server's count does not grow with the requests (the stand-in's 7 each time): 0 per request.
    assert rows["redis"][4:] == ["idempo", "0,", "floor", "0", "(-)"]
    tables = re.findall(r"table (idempo_bench_\w+) \(\d+ rows\) dropped at the end", proc.stderr)
    assert len(tables) == 6, proc.stderr  # a child each (3 sides x 2 sizes): idempo's table, or the floor's
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        left = conn.execute("SELECT tablename FROM pg_tables WHERE tablename = ANY(%s)", [tables]).fetchall()
    assert left == []
