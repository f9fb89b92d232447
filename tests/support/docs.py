"""The runner of the user documentation's code blocks (``tests/test_docs.py``): every fenced block of README.md and
docs/**/*.md is run, checked, or marked in the Markdown source as not run, with a reason.

Sybil (https://sybil.readthedocs.io) reads the Markdown: its lexers find the fenced blocks (in lists and quotes too)
and the ``<!-- invisible-code-block: python -->`` comments, its Document keeps one namespace per file so that a
file's blocks build on each other, and its Examples carry their line numbers. What each block is, and how it runs, is
decided here:

========================  ===========================================================================================
a block                   what the test does
========================  ===========================================================================================
``python``                runs it in the file's namespace; top-level ``await`` allowed (one event loop per file)
invisible ``python``      the same, unseen by readers: the checks that drive an example's app (``serve``) and assert
                          what the page says it does
``sh``                    runs it with bash (``set -euo pipefail``) in the file's scratch directory, ``.venv/bin``
                          first on the ``PATH``; commands that install, serve or reach the network must be marked
``json`` / ``toml``       parsed
marked ``run: pytest``    written to a file of its own and run by pytest in a subprocess (its own configuration:
                          pytest-asyncio in strict mode, not this project's auto mode)
marked ``not run: WHY``   not run; the reason is in the Markdown source, right above the block
anything else             a failure: mark it ``<!-- not run: why -->`` or teach this module to run it
========================  ===========================================================================================

Local servers: the blocks name Redis as ``redis://127.0.0.1:6379/0`` and PostgreSQL as
``postgresql://postgres@127.0.0.1:5432/postgres``; they run against ``IDEMPO_TEST_REDIS_URL`` and
``IDEMPO_TEST_POSTGRES_URL`` (``tests.support.environment``), and a block that names one whose server is not there
skips (fails under ``CI=true``).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
import types
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sybil import Document, Example, Region
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer

from .environment import POSTGRES_URL, REDIS_URL, require_server

__all__ = ["DOCUMENTS", "ROOT", "DocumentRun", "excerpt_of", "lifespan", "running", "serve"]

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"

# The pages whose blocks are run: the README and every page of the site.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# The servers as the pages name them, and where the tests find them.
DOC_REDIS = "redis://127.0.0.1:6379/0"
DOC_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"

_FENCES = RawFencedCodeBlockLexer(
    info_pattern=re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE), mapping={"info": "info", "source": "source"}
)
_INVISIBLE = DirectiveInHTMLCommentLexer(directive="invisible-code-block", arguments="python")
# A marker is an HTML comment right above its block (nothing but blank space between them).
_MARKER = re.compile(r"^[ \t]*<!--\s*(?P<kind>not run|run):\s*(?P<what>[^\n]*?)\s*-->", re.MULTILINE)
_MARKER_BEFORE = re.compile(_MARKER.pattern + r"\s*\Z", re.DOTALL | re.MULTILINE)

MODULE = "docs_example"
SH_TIMEOUT = 120.0
# Commands a `sh` block may not run unmarked: they install, start a server, or need another host.
_NOT_HERE = re.compile(
    r"^(sudo|pip|pipx|uv|apt|apt-get|make|curl|wget|uvicorn|gunicorn|hypercorn|systemctl|docker|kubectl|redis-cli|"
    r"psql|python examples/|idempo demo|idempo proxy(?!.*--check))\b"
)


@dataclass
class DocumentRun:
    """What one Markdown file's blocks share: a scratch directory, an event loop, and what was not run."""

    path: Path
    scratch: Path
    runner: asyncio.Runner = field(default_factory=asyncio.Runner)
    not_run: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def document(self) -> Document:
        """The page, parsed; its blocks run in the namespace of a module of their own, ``docs_example``, that is
        importable while they run (frameworks resolve a handler's annotations through its module)."""
        document = Document.parse(str(self.path), self.parse)
        module = types.ModuleType(MODULE)
        module.__file__ = str(self.scratch / "docs_example.py")
        sys.modules[MODULE] = module
        document.namespace = module.__dict__
        return document

    def examples(self) -> Iterator[Example]:
        yield from self.document().examples()

    def close(self) -> None:
        self.runner.close()
        sys.modules.pop(MODULE, None)

    # -- parsing -------------------------------------------------------------------------------------------------

    def parse(self, document: Document) -> Iterable[Region]:
        regions = [*_FENCES(document), *_INVISIBLE(document)]
        regions.sort(key=lambda region: region.start)
        used: set[int] = set()
        previous_end = 0
        for region in regions:
            if "info" in region.lexemes:
                before = document.text[previous_end : region.start]
                marker = _MARKER_BEFORE.search(before)
                if marker is not None:
                    used.add(previous_end + marker.start())
                yield self._block(region, marker)
            else:
                region.parsed = region.lexemes["source"]
                region.evaluator = self.run_python
                yield region
            previous_end = region.end
        inside = [(region.start, region.end) for region in regions]
        for marker in _MARKER.finditer(document.text):
            if marker.start() not in used and not any(start <= marker.start() < end for start, end in inside):
                yield Region(marker.start(), marker.end(), marker.group(0), self.orphan_marker)

    def _block(self, region: Region, marker: re.Match[str] | None) -> Region:
        region = self._choose(region, marker)
        evaluate = region.evaluator
        assert evaluate is not None

        def keeping(example: Example) -> Any:
            example.namespace.setdefault("docs_blocks", []).append(str(example.parsed))
            return evaluate(example)

        region.evaluator = keeping
        return region

    def _choose(self, region: Region, marker: re.Match[str] | None) -> Region:
        """*region* with the evaluator its language and its marker call for."""
        language = region.lexemes["info"].strip().split(" ")[0].lower()
        region.parsed = region.lexemes["source"]
        if marker is not None and marker["kind"] == "not run":
            region.evaluator = self.not_run_marked(language, marker["what"])
        elif marker is not None and marker["what"] != "pytest":
            region.evaluator = self.unknown(f"an unknown marker {marker[0]!r} (known: 'not run: why', 'run: pytest')")
        elif marker is not None and language == "python":
            region.evaluator = self.run_pytest
        elif marker is not None:
            region.evaluator = self.unknown(f"'run: pytest' above a {language or 'plain'} block")
        elif language == "python":
            region.evaluator = self.run_python
        elif language in ("sh", "bash", "shell"):
            region.evaluator = self.run_sh
        elif language == "json":
            region.evaluator = self.parse_json
        elif language == "toml":
            region.evaluator = self.parse_toml
        else:
            region.evaluator = self.unknown(
                f"a {language or 'plain'} block that this harness does not know how to run: mark it "
                "'<!-- not run: why -->' right above it, or teach tests/support/docs.py to run it"
            )
        return region

    # -- evaluators ----------------------------------------------------------------------------------------------

    def _where(self, example: Example) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{example.line}"

    def not_run_marked(self, language: str, why: str) -> Any:
        def evaluate(example: Example) -> None:
            if not why:
                raise AssertionError(f"{self._where(example)}: '<!-- not run: -->' needs a reason")
            self.not_run.append(f"{self._where(example)} ({language or 'plain'}): {why}")

        return evaluate

    def unknown(self, what: str) -> Any:
        def evaluate(example: Example) -> None:
            raise AssertionError(f"{self._where(example)}: {what}")

        return evaluate

    def orphan_marker(self, example: Example) -> None:
        raise AssertionError(f"{self._where(example)}: {example.parsed} is not right above a fenced block")

    def run_python(self, example: Example) -> None:
        source = _rewritten(str(example.parsed), example.namespace)
        padded = "\n" * (example.line + example.parsed.line_offset) + source
        code = compile(padded, str(self.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
        cwd = Path.cwd()
        os.chdir(self.scratch)
        printed = io.StringIO()
        try:
            with redirect_stdout(printed):
                if code.co_flags & inspect.CO_COROUTINE:
                    self.runner.run(eval(code, example.namespace))
                else:
                    exec(code, example.namespace)
        finally:
            os.chdir(cwd)
        if example.region.lexemes.get("info") is not None:  # a block the reader sees
            example.namespace["docs_last_block"] = str(example.parsed)
            example.namespace["docs_stdout"] = printed.getvalue()
        self.ran.append(f"{self._where(example)} python")

    def run_pytest(self, example: Example) -> None:
        test_file = self.scratch / f"test_docs_example_{example.line}.py"
        test_file.write_text(_rewritten(str(example.parsed), example.namespace))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file.name],
            cwd=self.scratch,
            env={**os.environ, "PYTHONPATH": str(self.scratch)},
            capture_output=True,
            text=True,
            timeout=SH_TIMEOUT,
            check=False,
        )
        if result.returncode != 0 or " passed" not in result.stdout:
            output = result.stdout + result.stderr
            raise AssertionError(f"{self._where(example)}: pytest failed on the example:\n{output}")
        self.ran.append(f"{self._where(example)} pytest")

    def run_sh(self, example: Example) -> None:
        source = str(example.parsed)
        for line in _commands(source):
            if _NOT_HERE.match(line):
                raise AssertionError(
                    f"{self._where(example)}: {line!r} installs, serves or needs another host: mark the block "
                    "'<!-- not run: why -->' (or show a command that can run here)"
                )
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + _rewritten(source, example.namespace)],
            cwd=self.scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=SH_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{self._where(example)}: the commands exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        example.namespace["sh_output"] = result.stdout
        self.ran.append(f"{self._where(example)} sh")

    def parse_json(self, example: Example) -> None:
        example.namespace["json_block"] = json.loads(str(example.parsed))
        self.ran.append(f"{self._where(example)} json")

    def parse_toml(self, example: Example) -> None:
        example.namespace["toml_block"] = tomllib.loads(str(example.parsed))
        example.namespace["toml_source"] = str(example.parsed)
        self.ran.append(f"{self._where(example)} toml")


def _commands(source: str) -> Iterator[str]:
    """The commands of a shell block, one per line (continuations joined), comments and assignments dropped."""
    for line in source.replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].strip()
        if words and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$", shlex.split(words)[0] if words else ""):
            yield words


def _rewritten(source: str, namespace: dict[str, Any]) -> str:
    """*source* as the tests run it: the local servers' addresses, then the page's own ``docs_rewrites`` (a mapping
    that an invisible block may set, e.g. from the address an example names to the one of a server it started)."""
    source = _local_servers(source)
    for old, new in namespace.get("docs_rewrites", {}).items():
        source = source.replace(old, new)
    return source


def _local_servers(source: str) -> str:
    """*source* with the pages' server addresses replaced by the tests' (skipping without the server)."""
    if DOC_REDIS in source or "redis://127.0.0.1:6379" in source:
        redis = require_server(REDIS_URL, 6379, "Redis", "run 'make services' or 'apt-get install redis-server'")
        source = source.replace(DOC_REDIS, redis).replace("redis://127.0.0.1:6379", redis.rsplit("/", 1)[0])
    if _DOC_POSTGRES.search(source):  # also as SQLAlchemy names it with a driver: postgresql+psycopg://...
        install = "run 'make services' or 'apt-get install postgresql'"
        postgres = require_server(POSTGRES_URL, 5432, "PostgreSQL", install)
        scheme, _, rest = postgres.partition("://")
        source = _DOC_POSTGRES.sub(lambda match: f"{scheme}{match[1] or ''}://{rest}", source)
    return source


_DOC_POSTGRES = re.compile(r"postgresql(\+\w+)?://postgres@127\.0\.0\.1:5432/postgres\b")


# -- helpers for the invisible checks ----------------------------------------------------------------------------


@contextmanager
def running(app: Any) -> Iterator[str]:
    """*app* served by uvicorn on a free port of 127.0.0.1, in a thread, for a block's sync clients; its URL.

    The socket listens before the server starts, so a request made at once waits in its backlog, not in a sleep."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def excerpt_of(path: str, block: str) -> None:
    """Check that *block* is an excerpt of the file at *path* (relative to the repository): each of its lines, but
    the ``...`` that stand for what it leaves out, appears there, in the same order (comments aside)."""

    def code(line: str) -> str:
        return line.split("  # ", 1)[0].strip()

    lines = [code(line) for line in (ROOT / path).read_text().splitlines()]
    at = 0
    for line in (code(line) for line in block.splitlines()):
        if line in ("", "...") or line.startswith(('"""', "#")):
            continue
        try:
            at = lines.index(line, at) + 1
        except ValueError:
            raise AssertionError(f"{line!r} is not in {path} (after line {at})") from None


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run *app*'s ASGI lifespan around the block, as a server does (start-up, then shut-down)."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        return await to_app.get()

    async def send(message: dict[str, Any]) -> None:
        await from_app.put(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        task.cancel()
        raise RuntimeError(f"the app's start-up failed: {started.get('message')}")
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await from_app.get()
        await task


@asynccontextmanager
async def serve(
    app: Any, *, headers: dict[str, str] | None = None, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls *app* in-process, its lifespan running; with ``raise_app_exceptions=False``, an
    exception the app raises is a 500, as a server answers it."""
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client
