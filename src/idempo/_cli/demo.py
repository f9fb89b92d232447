"""``idempo demo``: placeholder, being built (see the issue tracker)."""

from __future__ import annotations

import click


@click.command(name="demo")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'idempo demo' is not built yet")
