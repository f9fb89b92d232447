"""``idempo proxy``: a reverse proxy that gives any HTTP service the Idempotency-Key contract.

Every option of :class:`idempo.proxy.ProxyConfig` is a flag here, generated from the same table as the
configuration file's keys and the environment variables, so that the three never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

# The table is imported lazily by the command, but click needs the options when the group is built: this module
# imports only the configuration table, which is standard library only.
from idempo.proxy._config import OPTIONS, Option  # noqa: E402


def _click_option(option: Option) -> Callable[[F], F]:
    names = [option.flag]
    if option.name == "require_key_paths":
        names.append("--require-key-path")
    envvar_note = f" [env: {option.env}]"
    if option.kind == "bool":
        negative = "--no-" + option.name.replace("_", "-")
        return click.option(f"{option.flag}/{negative}", option.name, default=None, help=option.help + envvar_note)
    kwargs: dict[str, Any] = {"default": None, "help": option.help + envvar_note}
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.kind == "int":
        kwargs["type"] = int
    elif option.kind == "float":
        kwargs["type"] = float
    elif option.kind == "choice":
        kwargs["type"] = click.Choice(option.choices)
    elif option.kind == "list":
        kwargs["multiple"] = True
        kwargs["default"] = ()
    return click.option(*names, option.name, **kwargs)


def _with_options(function: F) -> F:
    for option in reversed(OPTIONS):
        function = _click_option(option)(function)
    return function


@click.command(name="proxy", context_settings={"max_content_width": 110})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A TOML file of options (keys as the flags, with underscores). [env: IDEMPO_PROXY_CONFIG]",
)
@click.option("--check", is_flag=True, help="Check the configuration, print it as JSON, and exit.")
@_with_options
def command(config_file: str | None, check: bool, **flags: Any) -> None:
    """Put the Idempotency-Key contract in front of any HTTP service.

    Keyed POST, PUT, PATCH and DELETE requests run once on the upstream; every retry gets the stored response.
    Options come from flags, then IDEMPO_PROXY_* environment variables, then the --config file, then defaults.
    The proxy's own endpoints are PREFIX/healthz and PREFIX/metrics (PREFIX is /_idempo/ by default).
    """
    from idempo._core.errors import ConfigurationError
    from idempo.proxy._config import load_config

    normalized: dict[str, Any] = {}
    for name, value in flags.items():
        if isinstance(value, tuple):  # list options: repeatable, and each value may be comma-separated
            value = tuple(part.strip() for item in value for part in item.split(",") if part.strip()) or None
        normalized[name] = value
    try:
        config = load_config(flags=normalized, config_file=config_file)
        if check:
            click.echo(config.to_json())
            return
        from idempo.proxy._serve import bind, serve
        from idempo.proxy._serve import check as check_config

        check_config(config)
        sockets = bind(config)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        serve(config, sockets)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
