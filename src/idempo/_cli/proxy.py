"""``idempo proxy``: placeholder, being built (see the issue tracker)."""

from __future__ import annotations

import click


@click.command(name="proxy")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'idempo proxy' is not built yet")
