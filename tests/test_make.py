"""The Makefile's first-run experience and its inner loop: ``make help`` lists every target; ``make demo`` installs
the ``cli`` extra only, and nothing when the full installation is there; ``make check`` runs lint, types and
``pytest --in-process``, which leaves out every test that needs a server, a browser or another process (marked
``external`` by ``tests/conftest.py``, and skipped where one starts a process or asks for a server)."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import in_process
from tests.support.environment import REDIS_URL, require_server, skip_or_fail

REPO = Path(__file__).resolve().parent.parent


def make(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        skip_or_fail("make is not installed: apt-get install make")
    # Not the flags of a make this suite may run under (make test): this make is a fresh one.
    env = {name: value for name, value in os.environ.items() if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_make_help_lists_every_target_with_its_comment() -> None:
    documented = re.findall(r"^([a-z][a-z-]*):.*?## (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    result = make("help")
    assert result.returncode == 0, result.stderr
    listed = [line.split(None, 1) for line in result.stdout.splitlines()[1:]]
    assert listed == [[target, comment] for target, comment in documented]
    assert {"check", "demo", "dist", "test", "install"} <= {target for target, _ in documented}
    assert make().stdout == result.stdout  # `make` alone says what there is


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A stand-in virtual environment whose ``python`` records its arguments instead of installing anything."""
    (tmp_path / "bin").mkdir()
    python = tmp_path / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    python.chmod(0o755)
    return tmp_path


def test_make_demo_installs_the_cli_extra_only(venv: Path) -> None:
    pyproject = (REPO / "pyproject.toml").stat().st_mtime
    result = make(f"VENV={venv}", f"{venv}/.demo-stamp")
    assert result.returncode == 0, result.stderr
    assert (venv / "calls").read_text() == "-m pip install -q --disable-pip-version-check -e .[cli]\n"
    assert (venv / ".demo-stamp").stat().st_mtime >= pyproject
    assert make(f"VENV={venv}", f"{venv}/.demo-stamp").stdout.endswith("is up to date.\n")


def test_make_demo_installs_nothing_over_the_full_installation(venv: Path) -> None:
    (venv / ".installed-stamp").touch()
    later = (REPO / "pyproject.toml").stat().st_mtime + 1
    os.utime(venv / ".installed-stamp", (later, later))
    result = make(f"VENV={venv}", f"{venv}/.demo-stamp")
    assert result.returncode == 0, result.stderr
    assert not (venv / "calls").exists()
    assert (venv / ".demo-stamp").exists()


def test_make_check_runs_lint_types_and_the_in_process_tests(venv: Path) -> None:
    (venv / ".installed-stamp").touch()
    later = (REPO / "pyproject.toml").stat().st_mtime + 1
    os.utime(venv / ".installed-stamp", (later, later))
    result = make("--dry-run", f"VENV={venv}", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{venv}/bin/ruff format --check .",
        f"{venv}/bin/ruff check .",
        f"{venv}/bin/lint-imports --no-cache --no-logo",
        f"{venv}/bin/mypy",
        f"{venv}/bin/python -m pytest -q --in-process ",
    ]


def test_in_process_leaves_out_the_tests_that_need_a_server_a_browser_or_processes() -> None:
    """The suite as ``make check`` collects it: none of the end-to-end, browser, slow or PostgreSQL-only modules,
    and the core's tests all there."""
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "--in-process", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    modules = {test_id.split("::")[0] for test_id in ids}
    for left_out in ("tests/e2e/", "tests/browser/", "tests/test_proxy_e2e.py", "tests/test_store_postgres_sync.py"):
        assert not any(module.startswith(left_out) for module in modules), left_out
    assert "tests/test_core_decide.py" in modules
    assert "tests/test_make.py::test_in_process_leaves_out_the_tests_that_need_a_server_a_browser_or_processes" in ids
    counts = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", collected.stdout)
    assert counts is not None, collected.stdout[-500:]
    kept, total, deselected = map(int, counts.groups())
    assert kept + deselected == total
    assert deselected >= 100


def test_the_in_process_guard_skips_a_test_where_it_starts_a_process_or_asks_for_a_server() -> None:
    was_enabled = in_process.enabled()  # under make check it is, and stays
    in_process.enable()
    try:
        with pytest.raises(pytest.skip.Exception, match=r"needs a child process \(true\): left out by --in-process"):
            subprocess.run(["true"], check=False)
        with pytest.raises(pytest.skip.Exception, match=r"needs a child process \(multiprocessing: "):
            multiprocessing.get_context("fork").Process(target=print).start()
        with pytest.raises(pytest.skip.Exception, match=r"needs a child process \(os\.fork\)"):
            os.fork()
        with pytest.raises(pytest.skip.Exception, match=r"needs Redis: left out by --in-process"):
            require_server(REDIS_URL, 6379, "Redis", "apt-get install redis-server")
    finally:
        if not was_enabled:
            in_process.disable()
    if not was_enabled:  # and undone: processes start again
        assert subprocess.run(["true"], check=False).returncode == 0
