"""A stand-in for callgrind in the test of ``benchmarks/instructions.py``: runs the command after it and reports on
stderr, as callgrind does, a count made up from what the command was: for a child of the benchmark, 1000 plus a
number per request of its side (none 10, idempo 50, floor 30); for a redis-server, 7."""

from __future__ import annotations

import subprocess
import sys

PER_REQUEST = {"none": 10, "idempo": 50, "floor": 30}

command = sys.argv[1:]
proc = subprocess.run(command, check=False)
if "--child" in command:
    at = command.index("--child")
    side, requests = command[at + 1], int(command[at + 4])
    count = 1000 + PER_REQUEST[side] * requests
else:
    count = 7
print(f"==1== Collected : {count}", file=sys.stderr)
sys.exit(proc.returncode)
