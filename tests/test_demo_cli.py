"""``idempo demo``'s command line: its help, and the clear one-line errors it gives instead of tracebacks.
Serving is tested by tests/browser, which runs the command as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import idempo.static
from idempo._cli import main
from idempo._cli.demo import _url


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["demo", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_help_describes_the_switches(capsys: pytest.CaptureFixture[str]) -> None:
    code, output = run(capsys, "--help")
    assert code == 0
    for words in ("--store URL", "--host", "--port", "dropped", "503", "422", "idempo turned off"):
        assert words in output


def test_an_unknown_store_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    code, output = run(capsys, "--store", "bogus://x")
    assert code == 1
    assert output.startswith("Error: unknown store scheme 'bogus'")
    assert "Traceback" not in output


def test_a_store_that_does_not_answer_hides_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    code, output = run(capsys, "--store", "redis://:hunter2@127.0.0.1:1/0")
    assert code == 1
    assert output.startswith("Error: the store does not answer")
    assert "hunter2" not in output
    assert "Traceback" not in output


def test_a_missing_store_extra_names_it(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    code, output = run(capsys, "--store", "redis://127.0.0.1:6379/0")
    assert code == 1
    assert "pip install 'idempo[redis]'" in output


@pytest.mark.parametrize("module", ["uvicorn", "starlette"])
def test_a_missing_cli_extra_names_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    code, output = run(capsys, "--store", "memory://")
    assert code == 1
    assert output.strip() == f"Error: the demo needs {module}, from the 'cli' extra: pip install 'idempo[cli]'"


def test_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, output = run(capsys, "--store", "memory://", "--host", "127.0.0.1", "--port", str(port))
    assert code == 1
    assert output.strip() == (
        f"Error: port {port} on 127.0.0.1 is already in use: pick another with --port (or --port 0 for any free one)"
    )


def test_an_unknown_host(capsys: pytest.CaptureFixture[str]) -> None:
    code, output = run(capsys, "--store", "memory://", "--host", "no-such-host.invalid", "--port", "0")
    assert code == 1
    assert output.startswith("Error: cannot listen on 'no-such-host.invalid'")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "http://127.0.0.1:{port}/"),
        ("0.0.0.0", "http://127.0.0.1:{port}/"),
        ("::1", "http://[::1]:{port}/"),
    ],
)
def test_the_url_printed(host: str, expected: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert _url(host, sock) == expected.format(port=port)


def test_idempo_js_ships_in_the_package() -> None:
    path = idempo.static.script_path()
    assert path.is_file()
    assert path.parent == idempo.static.directory()
    assert path.read_text(encoding="utf-8") == idempo.static.script_source()
    assert "export async function idempotentFetch" in idempo.static.script_source()


@pytest.mark.timeout(60)
def test_ctrl_c_stops_cleanly_and_removes_the_temporary_store() -> None:
    """The default store is a temporary SQLite file, said on start and gone after Ctrl+C, which exits with 0."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from idempo._cli import main; sys.exit(main())", "demo", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        url = re.fullmatch(r"idempo demo: open (http://127\.0\.0\.1:\d+/)\n", first)
        store = re.fullmatch(r"  store: sqlite:///(\S+) \(a temporary file, deleted on exit\)\n", second)
        assert url is not None, first
        assert store is not None, second
        db = Path(store.group(1))
        assert httpx.get(url.group(1) + "health", timeout=30).status_code == 200
        assert db.is_file()
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, rest
    assert rest.rstrip().endswith("idempo demo: stopped"), rest
    assert "Traceback" not in rest
    assert not db.parent.exists()
