"""The ``idempo`` command: ``demo``, ``proxy`` and ``keys``.

Built on click, which comes with the ``cli`` extra (``pip install 'idempo[cli]'``). Each subcommand lives in a module of
its own and imports what it needs (uvicorn, httpx, a store's client library) only when it runs, so that
``idempo --help`` is fast and says something useful whatever is installed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``idempo`` command line; returns the exit status."""
    try:
        import click  # noqa: F401
    except ModuleNotFoundError:
        print(
            "idempo: the command line needs the 'cli' extra; install it with: pip install 'idempo[cli]'",
            file=sys.stderr,
        )
        return 2
    from ._app import cli

    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="idempo", standalone_mode=True)
    except SystemExit as exc:  # standalone mode always ends with one
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
