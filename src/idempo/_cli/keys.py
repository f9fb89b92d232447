"""``idempo keys``: placeholder, being built (see the issue tracker)."""

from __future__ import annotations

import click


@click.command(name="keys")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'idempo keys' is not built yet")
