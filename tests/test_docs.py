"""Every code block of the user documentation runs: README.md and docs/**/*.md, one test per page.

Python blocks run in the page's namespace (top-level ``await`` allowed); the page's invisible blocks (Markdown
comments) then drive the apps it defines and check what it says they do; shell blocks run where it is safe and quick;
JSON and TOML are parsed. A block that is not run says so, with a reason, in the Markdown source
(``<!-- not run: why -->``), and a block the runner does not know how to run fails the test.
``tests/support/docs.py`` is the runner.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .support.docs import DOCUMENTS, ROOT, DocumentRun


@pytest.mark.parametrize("page", DOCUMENTS, ids=[str(path.relative_to(ROOT)) for path in DOCUMENTS])
def test_every_code_block_of_the_page_runs(page: Path, tmp_path: Path) -> None:
    run = DocumentRun(page, tmp_path)
    try:
        for example in run.examples():
            example.evaluate()
    finally:
        run.close()
    print(f"{page.relative_to(ROOT)}: ran {len(run.ran)}, not run {len(run.not_run)}", *run.not_run, sep="\n  ")


def test_the_contract_page_shows_the_table_the_code_decides_by() -> None:
    from idempo._core.decide import render_rows

    assert render_rows() in (ROOT / "docs" / "contract.md").read_text()


# -- the runner itself: what it refuses ---------------------------------------------------------------------------


def _run(tmp_path: Path, markdown: str) -> DocumentRun:
    page = tmp_path / "page.md"
    page.write_text(markdown)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = DocumentRun(page, scratch)
    try:
        for example in run.examples():
            example.evaluate()
    finally:
        run.close()
    return run


@pytest.mark.parametrize(
    ("markdown", "message"),
    [
        pytest.param("```yaml\na: 1\n```\n", "a yaml block that this harness does not know how to run", id="unknown"),
        pytest.param("```\nplain\n```\n", "a plain block", id="no language"),
        pytest.param("```sh\npip install idempo\n```\n", "'pip install idempo' installs, serves", id="unsafe sh"),
        pytest.param("<!-- not run: why -->\n\nSome prose.\n\n```yaml\na: 1\n```\n", "is not right above", id="orphan"),
        pytest.param("<!-- not run: -->\n```yaml\na: 1\n```\n", "needs a reason", id="no reason"),
        pytest.param("<!-- run: later -->\n```python\npass\n```\n", "an unknown marker", id="unknown marker"),
        pytest.param("```sh\nfalse\n```\n", "page.md:1: the commands exited 1", id="a failing command"),
    ],
)
def test_the_runner_fails_a_block_it_cannot_run_or_that_fails(tmp_path: Path, markdown: str, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        _run(tmp_path, markdown)


def test_the_runner_runs_blocks_in_one_namespace_and_records_what_it_did_not_run(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "```python\nx = 1\n```\n\n<!-- invisible-code-block: python\nassert x == 1\ny = 2\n-->\n\n"
        "```python\nimport asyncio\n\nawait asyncio.sleep(0)\nprint(x + y)\n```\n\n"
        "<!-- not run: a sample -->\n```text\n3\n```\n\n"
        "<!-- invisible-code-block: python\nassert docs_stdout == docs_blocks[-1] == '3\\n'\n-->\n\n"
        '```json\n{"a": 1}\n```\n\n```sh\necho hello\n```\n',
    )
    assert [entry.split(" ", 1)[1] for entry in run.ran] == ["python", "python", "python", "python", "json", "sh"]
    assert run.not_run == ["page.md:18 (text): a sample"]


def test_a_failing_python_block_fails_the_page_at_its_line(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="wrong") as failure:
        _run(tmp_path, "Text.\n\n```python\nx = 1\nassert x == 2, 'wrong'\n```\n")
    assert any(entry.lineno + 1 == 5 for entry in failure.traceback if str(entry.path).endswith("page.md"))
