"""Every code block of the user documentation runs: README.md and docs/**/*.md, one test per page.

Python blocks run in the page's namespace (top-level ``await`` allowed); the page's invisible blocks (Markdown
comments) then drive the apps it defines and check what it says they do; shell blocks run where it is safe and quick;
JSON and TOML are parsed. A block that is not run says so, with a reason, in the Markdown source
(``<!-- not run: why -->``), and a block the runner does not know how to run fails the test.
``tests/support/docs.py`` is the runner.
"""

from __future__ import annotations

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
