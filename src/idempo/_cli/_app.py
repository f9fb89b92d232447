"""The click group of the ``idempo`` command. Subcommands register themselves from their own modules."""

from __future__ import annotations

import click

from . import demo, keys, proxy


def _version() -> str:
    import idempo

    return str(idempo.__version__)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=_version(), prog_name="idempo", message="%(prog)s %(version)s")
def cli() -> None:
    """idempo: Idempotency-Key for HTTP services. Run a retried mutation once, replay its response to every retry."""


cli.add_command(demo.command)
cli.add_command(proxy.command)
cli.add_command(keys.command)
