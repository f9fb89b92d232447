"""The proxy's configuration: one table of options, read from a TOML file, the environment and the command line.

Every option has one name, spelled three ways: ``max_response_bytes`` in the file, ``IDEMPO_PROXY_MAX_RESPONSE_BYTES``
in the environment, ``--max-response-bytes`` on the command line. Precedence: flags > environment > file >
defaults. The file is ``--config PATH`` or ``IDEMPO_PROXY_CONFIG``.

Strictly private to :mod:`idempo.proxy`, apart from what it re-exports.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from .._core.errors import ConfigurationError
from .._core.policy import DEFAULT_METHODS, Policy, option_doc

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_STORE",
    "ENV_PREFIX",
    "OPTIONS",
    "Option",
    "ProxyConfig",
    "load_config",
    "parse_listen",
]

ENV_PREFIX: Final = "IDEMPO_PROXY_"
CONFIG_ENV: Final = "IDEMPO_PROXY_RESOLVED_CONFIG"
"""The environment variable through which ``idempo proxy`` hands its resolved configuration (JSON) to its workers."""
DEFAULT_STORE: Final = "sqlite:///idempo-proxy.db"
"""An SQLite file ``idempo-proxy.db`` in the directory the proxy is started from (shared by its workers)."""

Kind = Literal["str", "int", "float", "bool", "bytes", "list", "choice"]


@dataclass(frozen=True)
class Option:
    """One setting: its name, how a string becomes its value, and its help. Strictly private."""

    name: str
    kind: Kind
    help: str
    choices: tuple[str, ...] = ()
    metavar: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``idempo proxy`` needs to run: where to listen, where to forward, and the middleware's options.

    Build it with :func:`load_config` (file, environment and flags), or directly in Python; then
    :func:`~idempo.proxy.create_app` turns it into an ASGI application.
    """

    upstream: str
    store: str = DEFAULT_STORE
    listen: str = "127.0.0.1:8080"
    workers: int = 1
    prefix: str = "/_idempo/"
    admin_listen: str = ""
    # Forwarding.
    host_header: Literal["client", "upstream"] = "client"
    trust_forwarded: bool = False
    connect_timeout: float = 5.0
    upstream_timeout: float = 60.0
    max_connections: int = 100
    body_timeout: float = 60.0
    max_buffered_bytes: int = 128 * 1024 * 1024
    # Logs.
    access_log: bool = True
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # The middleware: its policy's options, with the policy's defaults (and checks: see the policy property).
    ttl: float = Policy.ttl
    lease: float = Policy.lease
    header: str = Policy.header
    methods: tuple[str, ...] = DEFAULT_METHODS
    require_key: bool = False
    require_key_paths: tuple[str, ...] = ()
    principal_header: str = "Authorization"
    canonical_json: bool = Policy.canonical_json
    canonical_json_max_bytes: int = Policy.canonical_json_max_bytes
    on_conflict: Literal["reject", "wait"] = Policy.on_conflict
    wait_timeout: float = Policy.wait_timeout
    on_store_error: Literal["fail_closed", "fail_open"] = Policy.on_store_error
    retry_after: int = Policy.retry_after
    max_request_bytes: int = Policy.max_request_bytes
    max_response_bytes: int = Policy.max_response_bytes
    unknown_outcome_ttl: float | None = Policy.unknown_outcome_ttl
    store_server_errors: bool = Policy.store_server_errors
    replay_set_cookie: bool = Policy.replay_set_cookie
    problem_base_uri: str = Policy.problem_base_uri
    cache_size: int = Policy.cache_size
    cache_ttl: float = Policy.cache_ttl
    startup_check: Literal["fail", "warn", "off"] = Policy.startup_check

    def __post_init__(self) -> None:
        _validate(self)

    def to_json(self) -> str:
        """This configuration as JSON (how the proxy hands it to its worker processes)."""
        values = {o.name: getattr(self, o.name) for o in OPTIONS}
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> ProxyConfig:
        """The inverse of :meth:`to_json`."""
        values: dict[str, Any] = json.loads(text)
        converted: dict[str, Any] = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
        return cls(**converted)

    def requires_key(self, path: str) -> bool:
        """Whether a protected request to *path* must carry a key (``require_key`` or a ``require_key_paths``
        pattern: a glob if it has ``*``, ``?`` or ``[``, else a path prefix)."""
        if self.require_key:
            return True
        return any(_path_matches(pattern, path) for pattern in self.require_key_paths)

    @property
    def policy(self) -> Policy:
        """The middleware's :class:`~idempo.Policy`: the options above that are its fields, and ``require_key``
        with ``require_key_paths``."""
        policy: Policy = self.__dict__["_policy"]
        return policy

    @property
    def host_port(self) -> tuple[str, int]:
        """``listen`` split into host and port."""
        return parse_listen(self.listen)


OPTIONS: Final[tuple[Option, ...]] = (
    Option("upstream", "str", "The service to forward to, e.g. http://127.0.0.1:8000 (required).", metavar="URL"),
    Option("store", "str", f"Where records are kept: a store URL (default {DEFAULT_STORE}).", metavar="URL"),
    Option(
        "listen", "str", "Address to listen on, HOST:PORT (default 127.0.0.1:8080; port 0 picks one).", metavar="ADDR"
    ),
    Option("workers", "int", "Worker processes (default 1).", metavar="N"),
    Option("prefix", "str", "Path prefix of the proxy's own endpoints (default /_idempo/).", metavar="PATH"),
    Option(
        "admin_listen",
        "str",
        "Serve the proxy's own endpoints on this HOST:PORT only, never on the public listener (default: off).",
        metavar="ADDR",
    ),
    Option(
        "host_header",
        "choice",
        "Host sent upstream: the client's (default) or the upstream URL's.",
        ("client", "upstream"),
    ),
    Option(
        "trust_forwarded",
        "bool",
        "Keep the Forwarded/X-Forwarded-*/X-Real-IP headers a proxy in front set, instead of dropping them.",
    ),
    Option("connect_timeout", "float", "Seconds to connect to the upstream (default 5).", metavar="S"),
    Option(
        "upstream_timeout", "float", "Seconds the upstream may take to send or accept data (default 60).", metavar="S"
    ),
    Option("max_connections", "int", "Connections kept open to the upstream, per worker (default 100).", metavar="N"),
    Option(
        "body_timeout",
        "float",
        "Seconds a keyed request's body may take to arrive (default 60); 408 after.",
        metavar="S",
    ),
    Option(
        "max_buffered_bytes",
        "bytes",
        "Keyed request bodies held in memory at once, per worker (default 128MiB); 503 above.",
        metavar="SIZE",
    ),
    Option("access_log", "bool", "One JSON line per request on stderr (default on)."),
    Option("log_level", "choice", "Level of the server's own logs.", ("critical", "error", "warning", "info", "debug")),
    Option("ttl", "float", option_doc("ttl"), metavar="S"),
    Option("lease", "float", option_doc("lease"), metavar="S"),
    Option("header", "str", option_doc("header"), metavar="NAME"),
    Option("methods", "list", option_doc("methods").replace("methods;", "methods, comma-separated;"), metavar="M,M"),
    Option("require_key", "bool", "Answer 400 to every protected request without a key."),
    Option(
        "require_key_paths",
        "list",
        "Paths where a key is required: a glob (/orders/*) or a prefix (/payments/). Repeatable.",
        metavar="PATTERN",
    ),
    Option("principal_header", "str", "Header whose value namespaces records (default Authorization).", metavar="NAME"),
    Option("canonical_json", "bool", option_doc("canonical_json")),
    Option("canonical_json_max_bytes", "bytes", option_doc("canonical_json_max_bytes"), metavar="SIZE"),
    Option("on_conflict", "choice", option_doc("on_conflict"), ("reject", "wait")),
    Option("wait_timeout", "float", option_doc("wait_timeout"), metavar="S"),
    Option("on_store_error", "choice", option_doc("on_store_error"), ("fail_closed", "fail_open")),
    Option("retry_after", "int", option_doc("retry_after"), metavar="S"),
    Option("max_request_bytes", "bytes", option_doc("max_request_bytes"), metavar="SIZE"),
    Option("max_response_bytes", "bytes", option_doc("max_response_bytes"), metavar="SIZE"),
    Option("unknown_outcome_ttl", "float", option_doc("unknown_outcome_ttl"), metavar="S"),
    Option("store_server_errors", "bool", option_doc("store_server_errors")),
    Option("replay_set_cookie", "bool", option_doc("replay_set_cookie")),
    Option("problem_base_uri", "str", option_doc("problem_base_uri"), metavar="URI"),
    Option("cache_size", "int", option_doc("cache_size"), metavar="N"),
    Option("cache_ttl", "float", option_doc("cache_ttl"), metavar="S"),
    Option("startup_check", "choice", option_doc("startup_check"), ("fail", "warn", "off")),
)
_BY_NAME: Final = {o.name: o for o in OPTIONS}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_SIZE: Final = re.compile(r"\s*(\d+)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}


def parse_size(text: str) -> int:
    """``"10MiB"`` -> 10485760: an int of bytes, with an optional unit (B, KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        msg = f"not a size: {text!r} (use bytes, or a unit: 512KiB, 10MiB, 1GB)"
        raise ValueError(msg)
    number, unit = int(match[1]), (match[2] or "").lower()
    if unit.endswith("ib") or unit in ("ki", "mi", "gi"):
        return int(number * 1024 ** ("kmg".index(unit[0]) + 1))
    return number * _UNITS[unit]


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ``("127.0.0.1", 8080)``; IPv6 in brackets: ``"[::1]:8080"``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        msg = f"listen={listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080"
        raise ConfigurationError(msg)
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return host, int(port)


def _path_matches(pattern: str, path: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path.startswith(pattern)


def _from_string(option: Option, text: str) -> Any:
    """A value given as text (environment, or a flag) converted to the option's type."""
    kind = option.kind
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bytes":
        return parse_size(text)
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        msg = f"expected true or false, not {text!r}"
        raise ValueError(msg)
    if kind == "list":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _from_toml(option: Option, value: object) -> Any:
    """A value read from the TOML file, checked against the option's type."""
    kind = option.kind
    if isinstance(value, str) and kind not in ("str", "choice", "list"):
        return _from_string(option, value)  # "10MiB", or a number written as a string
    if kind in ("str", "choice"):
        if isinstance(value, str):
            return value
    elif kind in ("int", "bytes"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "list":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    expected = {"str": "a string", "choice": "a string", "int": "an integer", "bytes": "an integer or a size string"}
    expected |= {"float": "a number", "bool": "true or false", "list": "a list of strings"}
    msg = f"expected {expected[kind]}, not {value!r}"
    raise ValueError(msg)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        msg = f"config file {str(path)!r} does not exist"
        raise ConfigurationError(msg) from None
    except OSError as exc:
        msg = f"config file {str(path)!r} cannot be read: {exc.strerror or exc}"
        raise ConfigurationError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {str(path)!r} is not valid TOML: {exc}"
        raise ConfigurationError(msg) from None
    # A file may put everything at its top level, or under a [proxy] table (to share a file with other tools).
    table = data.get("proxy", data) if set(data) <= {"proxy"} else data
    if not isinstance(table, dict):
        msg = f"config file {str(path)!r}: [proxy] must be a table"
        raise ConfigurationError(msg)
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        option = _BY_NAME.get(name)
        if option is None:
            known = ", ".join(o.name for o in OPTIONS)
            msg = f"config file {str(path)!r}: unknown option {key!r}; known options: {known}"
            raise ConfigurationError(msg)
        try:
            values[name] = _from_toml(option, value)
        except ValueError as exc:
            msg = f"config file {str(path)!r}: {key}: {exc}"
            raise ConfigurationError(msg) from None
    return values


def _read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        text = environ.get(option.env)
        if text is None or text == "":
            continue
        try:
            values[option.name] = _from_string(option, text)
        except ValueError as exc:
            msg = f"{option.env}={text!r}: {exc}"
            raise ConfigurationError(msg) from None
    return values


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ProxyConfig:
    """Build a :class:`ProxyConfig` from its three sources; flags win over the environment, which wins over the file.

    Args:
        flags: option values given on the command line, by option name (``None`` values count as not given), already
            of the option's type; strings are converted as the environment's are.
        environ: the environment (``IDEMPO_PROXY_<NAME>``); ``os.environ`` by default. Lists are comma-separated;
            booleans are ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``).
        config_file: a TOML file; if ``None``, the one ``IDEMPO_PROXY_CONFIG`` names, if any. Keys are option
            names, at the top level or under ``[proxy]``.

    Raises:
        ConfigurationError: an unreadable or invalid file, an unknown key, a value of the wrong type, or a missing
            ``upstream``. The message says which source and which option.
    """
    if environ is None:
        import os

        environ = os.environ
    if config_file is None:
        config_file = environ.get(ENV_PREFIX + "CONFIG") or None
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_file(Path(config_file)))
    values.update(_read_environment(environ))
    for name, value in (flags or {}).items():
        if value is None or (isinstance(value, tuple | list) and not value):
            continue
        option = _BY_NAME[name]
        if isinstance(value, str) and option.kind not in ("str", "choice"):
            try:
                value = _from_string(option, value)
            except ValueError as exc:
                msg = f"{option.flag} {value!r}: {exc}"
                raise ConfigurationError(msg) from None
        values[name] = tuple(value) if isinstance(value, list) else value
    if not values.get("upstream"):
        msg = "no upstream: pass --upstream URL, set IDEMPO_PROXY_UPSTREAM, or put upstream = '...' in the config file"
        raise ConfigurationError(msg)
    config: ProxyConfig = ProxyConfig(**values)
    return config


_CHECKS: Final[tuple[tuple[str, Callable[[Any], bool], str], ...]] = (
    ("workers", lambda v: v >= 1, "must be at least 1"),
    ("connect_timeout", lambda v: v > 0, "must be positive"),
    ("upstream_timeout", lambda v: v > 0, "must be positive"),
    ("max_connections", lambda v: v >= 1, "must be at least 1"),
    ("body_timeout", lambda v: v > 0, "must be positive"),
    ("principal_header", lambda v: bool(v) and v.isascii() and " " not in v, "must be a header name"),
)
# The middleware's options that are fields of its policy (which checks them).
_POLICY_FIELDS: Final = tuple(field.name for field in dataclasses.fields(Policy) if field.name != "require_key")


def _validate(config: ProxyConfig) -> None:
    for option in OPTIONS:
        value = getattr(config, option.name)
        if option.kind == "choice" and value not in option.choices:
            msg = f"{option.name}={value!r}: expected one of {', '.join(option.choices)}"
            raise ConfigurationError(msg)
    for name, check, what in _CHECKS:
        if not check(getattr(config, name)):
            msg = f"{name}={getattr(config, name)!r}: {what}"
            raise ConfigurationError(msg)
    upstream = urlsplit(config.upstream)
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        msg = f"upstream={config.upstream!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000"
        raise ConfigurationError(msg)
    if upstream.username is not None or upstream.password is not None:
        msg = "upstream: credentials in the URL are not supported (the client's Authorization header is forwarded)"
        raise ConfigurationError(msg)
    if upstream.query or upstream.fragment:
        msg = f"upstream={config.upstream!r}: a query string or fragment cannot be forwarded to"
        raise ConfigurationError(msg)
    if not config.prefix.startswith("/") or not config.prefix.endswith("/") or config.prefix == "/":
        msg = f"prefix={config.prefix!r}: expected a path that starts and ends with '/', e.g. /_idempo/"
        raise ConfigurationError(msg)
    _, port = parse_listen(config.listen)
    if config.admin_listen:
        _, admin_port = parse_listen(config.admin_listen)
        if admin_port == port != 0:
            msg = f"admin_listen={config.admin_listen!r}: needs a port of its own, not the listen port {port}"
            raise ConfigurationError(msg)
    if config.max_buffered_bytes < config.max_request_bytes:
        msg = (
            f"max_buffered_bytes={config.max_buffered_bytes}: must be at least max_request_bytes "
            f"({config.max_request_bytes}), or no body of the largest size accepted could ever be buffered"
        )
        raise ConfigurationError(msg)
    object.__setattr__(config, "methods", tuple(m.upper() for m in config.methods))
    object.__setattr__(config, "require_key_paths", tuple(config.require_key_paths))
    options = {name: getattr(config, name) for name in _POLICY_FIELDS}
    require_key = config.requires_key if config.require_key_paths else config.require_key
    config.__dict__["_policy"] = Policy(require_key=require_key, **options)


def replace(config: ProxyConfig, **changes: Any) -> ProxyConfig:
    """A copy of *config* with *changes* (validated again)."""
    return dataclasses.replace(config, **changes)
