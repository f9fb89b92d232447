"""Browser tests: pytest drives Debian's headless Chromium through Playwright against ``idempo demo``, run as a real
uvicorn subprocess on a free port of 127.0.0.1.

Chromium is Debian's (``/usr/bin/chromium``, or ``IDEMPO_CHROMIUM``), never a browser Playwright downloads.
Without it (or without the playwright package) these tests skip and say what to install; under ``CI=true`` they
fail instead. ``make test`` runs ``scripts/browser`` first, which installs Chromium with apt-get where it can.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import pytest

from tests.support.environment import skip_or_fail

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("IDEMPO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_DEADLINE = 30.0
PAGE_TIMEOUT_MS = 20_000  # the longest any one wait on the page may take (the slow switch needs about 5 s)


def _unavailable(what: str) -> NoReturn:
    skip_or_fail(what)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's headless Chromium, launched once per module.

    Not once per session: Playwright's sync API keeps an event loop running in this thread while it is open,
    which the async tests of other modules (pytest-asyncio) could not run beside.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ModuleNotFoundError:
        _unavailable("the playwright package is not installed: pip install -e '.[dev]'")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"Chromium is not installed at {CHROMIUM}: run 'scripts/browser' (or 'apt-get install chromium')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Demo:
    """A running ``idempo demo``, and what it printed."""

    url: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def charges(self) -> list[dict[str, Any]]:
        """The charges the service made: its side effects, read from the server."""
        charges: list[dict[str, Any]] = httpx.get(self.url + "api/charges", timeout=10).json()["charges"]
        return charges

    def attempts(self) -> list[dict[str, Any]]:
        """Every charge request the server received, in order, with the fault it applied and what it answered."""
        attempts: list[dict[str, Any]] = httpx.get(self.url + "api/attempts", timeout=10).json()["attempts"]
        return attempts


def _pump(stream: Any, lines: queue.Queue[str | None], output: list[str]) -> None:
    for line in stream:
        output.append(line)
        lines.put(line)
    lines.put(None)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """``idempo demo --port 0`` on a fresh SQLite store in a subprocess; the URL is the one it prints."""
    command = [
        sys.executable,
        "-c",
        "import sys; from idempo._cli import main; sys.exit(main())",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--store",
        f"sqlite:///{tmp_path / 'idempo.db'}",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []
    reader = threading.Thread(target=_pump, args=(process.stdout, lines, output), daemon=True)
    reader.start()
    try:
        url = None
        while url is None:
            try:
                line = lines.get(timeout=STARTUP_DEADLINE)
            except queue.Empty:
                pytest.fail(f"idempo demo printed no URL within {STARTUP_DEADLINE} s:\n{''.join(output)}")
            if line is None:
                pytest.fail(f"idempo demo exited with {process.wait()}:\n{''.join(output)}")
            if match := re.search(r"open (http://\S+/)", line):
                url = match.group(1)
        # The socket listens before the URL is printed: this request waits in its backlog until uvicorn serves.
        assert httpx.get(url + "health", timeout=STARTUP_DEADLINE).json() == {"ok": True}
        yield Demo(url, process, output)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl+C does: uvicorn shuts down, the command cleans up
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    log = "".join(output)
    assert process.returncode == 0, log
    assert log.rstrip().endswith("idempo demo: stopped"), log
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


@pytest.fixture
def page(browser: Browser, demo: Demo) -> Iterator[Page]:
    """The demo page, loaded in a fresh browser context, with idempo.js imported and bound."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    opened = context.new_page()
    opened.set_default_timeout(PAGE_TIMEOUT_MS)
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(demo.url)
    opened.wait_for_selector("body[data-ready=true]")
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], errors
