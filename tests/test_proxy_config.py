"""The proxy's configuration: file, environment and flags, their precedence, and the command's clear errors."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from idempo import ConfigurationError
from idempo._cli._app import cli
from idempo.proxy import DEFAULT_STORE, OPTIONS, ProxyConfig, load_config
from idempo.proxy._config import parse_listen, parse_size

UPSTREAM = "http://127.0.0.1:9"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "idempo.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config(flags={"upstream": UPSTREAM}, environ={})
    assert config.store == DEFAULT_STORE == "sqlite:///idempo-proxy.db"
    assert config.listen == "127.0.0.1:8080"
    assert config.workers == 1
    assert config.prefix == "/_idempo/"
    assert config.methods == ("POST", "PUT", "PATCH", "DELETE")
    assert config.host_header == "client"
    assert config.ttl == 86_400
    assert config.max_request_bytes == 10 * 1024 * 1024


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'upstream = "http://file:1"\nstore = "memory://"\nworkers = 3\nttl = 60\nlease = 10\n',
    )
    environ = {
        "IDEMPO_PROXY_STORE": "sqlite:///env.db",
        "IDEMPO_PROXY_WORKERS": "5",
        "IDEMPO_PROXY_TTL": "120",
    }
    config = load_config(flags={"workers": 7, "ttl": None}, environ=environ, config_file=path)
    assert config.upstream == "http://file:1"  # the file only
    assert config.lease == 10  # the file only
    assert config.store == "sqlite:///env.db"  # env over file
    assert config.ttl == 120  # env over file; a flag that was not given (None) does not count
    assert config.workers == 7  # flag over env and file
    assert config.retry_after == 1  # nobody: the default


def test_the_environment_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nupstream = "http://from-file:1"\n')
    assert load_config(environ={"IDEMPO_PROXY_CONFIG": str(path)}).upstream == "http://from-file:1"


def test_every_option_has_a_flag_an_environment_variable_and_a_file_key(tmp_path: Path) -> None:
    names = {option.name for option in OPTIONS}
    assert names == {field for field in ProxyConfig.__dataclass_fields__}
    for option in OPTIONS:
        assert option.env == "IDEMPO_PROXY_" + option.name.upper()
        assert option.flag == "--" + option.name.replace("_", "-")
    help_text = CliRunner().invoke(cli, ["proxy", "--help"], terminal_width=200).output
    for option in OPTIONS:
        assert option.flag in help_text, option.flag


def test_values_of_every_kind_from_the_environment() -> None:
    environ = {
        "IDEMPO_PROXY_UPSTREAM": UPSTREAM,
        "IDEMPO_PROXY_METHODS": "post, put",
        "IDEMPO_PROXY_REQUIRE_KEY_PATHS": "/orders/*,/payments/",
        "IDEMPO_PROXY_STORE_SERVER_ERRORS": "yes",
        "IDEMPO_PROXY_ACCESS_LOG": "off",
        "IDEMPO_PROXY_MAX_RESPONSE_BYTES": "2MiB",
        "IDEMPO_PROXY_MAX_REQUEST_BYTES": "512k",
        "IDEMPO_PROXY_ON_CONFLICT": "wait",
        "IDEMPO_PROXY_WAIT_TIMEOUT": "2.5",
        "IDEMPO_PROXY_HOST_HEADER": "upstream",
    }
    config = load_config(environ=environ)
    assert config.methods == ("POST", "PUT")
    assert config.require_key_paths == ("/orders/*", "/payments/")
    assert config.store_server_errors is True
    assert config.access_log is False
    assert config.max_response_bytes == 2 * 1024 * 1024
    assert config.max_request_bytes == 512_000
    assert config.on_conflict == "wait"
    assert config.wait_timeout == 2.5
    assert config.host_header == "upstream"


def test_values_of_every_kind_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
upstream = "https://api.internal:8443/base"
methods = ["POST", "patch"]
require-key-paths = "/orders/*"
canonical_json = true
max_request_bytes = "1MB"
max_response_bytes = 4096
cache_ttl = 5
""",
    )
    config = load_config(config_file=path, environ={})
    assert config.upstream == "https://api.internal:8443/base"
    assert config.methods == ("POST", "PATCH")
    assert config.require_key_paths == ("/orders/*",)
    assert config.canonical_json is True
    assert config.max_request_bytes == 1_000_000
    assert config.max_response_bytes == 4096
    assert config.cache_ttl == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('upstream = "http://x:1"\nwokers = 2\n', "unknown option 'wokers'"),
        ('upstream = "http://x:1"\nworkers = "two"\n', "workers: invalid literal"),
        ('upstream = "http://x:1"\nworkers = true\n', "workers: expected an integer"),
        ('upstream = "http://x:1"\nmethods = [1]\n', "methods: expected a list of strings"),
        ("upstream = \n", "is not valid TOML"),
        ('upstream = "http://x:1"\non_conflict = "queue"\n', "on_conflict='queue': expected one of reject, wait"),
        ('upstream = "ftp://x"\n', "expected an http:// or https:// URL"),
        ('upstream = "http://u:p@x:1"\n', "credentials in the URL are not supported"),
        ('upstream = "http://x:1/?a=1"\n', "a query string or fragment cannot be forwarded to"),
        ('upstream = "http://x:1"\nttl = 0\n', "ttl=0.0: must be positive"),
        ('upstream = "http://x:1"\nlisten = "8080"\n', "expected HOST:PORT"),
        ('upstream = "http://x:1"\nprefix = "/"\n', "prefix='/'"),
        ('upstream = "http://x:1"\nmax_request_bytes = "lots"\n', "not a size: 'lots'"),
        ('upstream = "http://x:1"\nunknown_outcome_ttl = 0\n', "unknown_outcome_ttl=0.0: must be positive"),
        ('upstream = "http://x:1"\nbody_timeout = 0\n', "body_timeout=0.0: must be positive"),
        ('upstream = "http://x:1"\nmax_buffered_bytes = "1MiB"\n', "must be at least max_request_bytes"),
        ('upstream = "http://x:1"\nadmin_listen = "9100"\n', "expected HOST:PORT"),
        ('upstream = "http://x:1"\nlisten = ":9100"\nadmin_listen = "127.0.0.1:9100"\n', "needs a port of its own"),
    ],
)
def test_a_bad_file_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(config_file=write(tmp_path, text), environ={})
    assert message in str(info.value)


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="IDEMPO_PROXY_STORE_SERVER_ERRORS='maybe'"):
        load_config(environ={"IDEMPO_PROXY_UPSTREAM": UPSTREAM, "IDEMPO_PROXY_STORE_SERVER_ERRORS": "maybe"})


def test_no_upstream_says_the_three_ways_to_give_one() -> None:
    with pytest.raises(ConfigurationError, match="--upstream URL, set IDEMPO_PROXY_UPSTREAM"):
        load_config(environ={})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_config(config_file=tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("10", 10), ("10B", 10), ("1KB", 1000), ("1KiB", 1024), ("10MiB", 10 * 1024**2), ("2 GB", 2 * 10**9)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_listen_addresses() -> None:
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen(":8080") == ("127.0.0.1", 8080)


def test_require_key_paths_are_globs_or_prefixes() -> None:
    config = ProxyConfig(upstream=UPSTREAM, require_key_paths=("/orders/*", "/payments/"))
    assert config.requires_key("/orders/1")
    assert not config.requires_key("/orders")
    assert config.requires_key("/payments/1/refund")
    assert not config.requires_key("/users")
    assert ProxyConfig(upstream=UPSTREAM, require_key=True).requires_key("/users")


def test_the_new_options_from_each_source(tmp_path: Path) -> None:
    defaults = load_config(flags={"upstream": UPSTREAM}, environ={})
    assert defaults.unknown_outcome_ttl is None  # the middleware's default: ttl
    assert defaults.body_timeout == 60
    assert defaults.max_buffered_bytes == 128 * 1024 * 1024
    assert defaults.admin_listen == ""
    path = write(tmp_path, 'upstream = "http://x:1"\nunknown_outcome_ttl = 600\nmax_buffered_bytes = "64MiB"\n')
    environ = {"IDEMPO_PROXY_BODY_TIMEOUT": "7.5", "IDEMPO_PROXY_ADMIN_LISTEN": "127.0.0.1:9100"}
    config = load_config(config_file=path, environ=environ, flags={"unknown_outcome_ttl": "900"})
    assert config.unknown_outcome_ttl == 900
    assert config.max_buffered_bytes == 64 * 1024 * 1024
    assert config.body_timeout == 7.5
    assert config.admin_listen == "127.0.0.1:9100"
    assert ProxyConfig.from_json(config.to_json()) == config


def test_the_configuration_survives_the_trip_to_the_workers() -> None:
    config = ProxyConfig(upstream=UPSTREAM, methods=("POST",), require_key_paths=("/a/*",), ttl=5)
    assert ProxyConfig.from_json(config.to_json()) == config


# -- the command's errors: one line, no traceback -----------------------------------------------------------------


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    environ = {name: "" for name in ("IDEMPO_PROXY_CONFIG", *(option.env for option in OPTIONS))}
    return CliRunner().invoke(cli, ["proxy", *args], env={**environ, **(env or {})}, catch_exceptions=False)


def assert_clean_error(result: Any, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: "), result.output  # one line, click's, not a traceback
    assert message in result.output, result.output


def test_check_prints_the_resolved_configuration(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "http://file:1"\nworkers = 2\n')
    result = run("--config", str(path), "--check", "--methods", "POST,put", "--require-key-path", "/a/*", env={
        "IDEMPO_PROXY_WORKERS": "3",
    })  # fmt: skip
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["upstream"] == "http://file:1"
    assert resolved["workers"] == 3
    assert resolved["methods"] == ["POST", "PUT"]
    assert resolved["require_key_paths"] == ["/a/*"]


def test_a_bad_store_url_is_one_clear_line() -> None:
    result = run("--upstream", UPSTREAM, "--store", "mysql://db/x", "--listen", "127.0.0.1:0")
    assert_clean_error(result, "unknown store scheme 'mysql'")


def test_a_memory_store_with_several_workers_is_refused() -> None:
    result = run("--upstream", UPSTREAM, "--store", "memory://", "--workers", "2", "--listen", "127.0.0.1:0")
    assert_clean_error(result, "lives inside one process")


def test_a_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    result = run("--upstream", UPSTREAM, "--store", "redis://127.0.0.1:6379/0", "--listen", "127.0.0.1:0")
    assert_clean_error(result, "pip install 'idempo[redis]'")


def test_a_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--upstream", UPSTREAM, "--store", f"sqlite:///{tmp_path}/x.db", "--listen", f"127.0.0.1:{port}")
    assert_clean_error(result, "already in use")


def test_an_admin_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--upstream", UPSTREAM, "--store", f"sqlite:///{tmp_path}/x.db", "--listen", "127.0.0.1:0",
                     "--admin-listen", f"127.0.0.1:{port}")  # fmt: skip
    assert_clean_error(result, f"cannot listen on 127.0.0.1:{port}: the address is already in use")


def test_a_bad_config_file_is_one_clear_line(tmp_path: Path) -> None:
    result = run("--config", str(write(tmp_path, "upstream = [")))
    assert_clean_error(result, "is not valid TOML")
