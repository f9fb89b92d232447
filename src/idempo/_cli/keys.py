"""``idempo keys``: look at and maintain the records of a store (``list``, ``show``, ``delete``, ``purge``).

Every subcommand opens the store its ``--store`` URL names (or ``$IDEMPO_STORE``) as a sync store, runs one
operation and closes it. Listing needs the optional ``scan`` capability (every built-in store has it).

Store keys come in three shapes, told apart here only for display:

- ``<principal digest>:<Idempotency-Key>``: the middleware's (32 hex characters, then the client's key);
- ``fn:<namespace>:<key>``: the ``@idempotent`` decorator's, whose payload is a function's result, not a response;
- anything else: a key some other code wrote, shown whole.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from .._core.codec import StoredResponse, TooLargeMarker, decode_response
from .._core.errors import ConfigurationError, MissingDependency, StoreError
from .._core.records import Record, State
from ..stores import SyncScanningStore, SyncStore, parse_store_url, redact, sync_store_from_url
from ..stores.sqlite import SyncSQLiteStore

_T = TypeVar("_T")
_MIDDLEWARE_KEY = re.compile(r"(?P<principal>[0-9a-f]{32}):(?P<key>.*)", re.DOTALL)
_DIGEST = re.compile(r"[0-9a-f]{1,32}")
_SHORT = 8  # characters of a principal digest shown in the table


# -- what a record is, for a person --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parts:
    """A store key, split: its kind (``http``, ``fn`` or ``other``), whose it is, and the key proper."""

    kind: str
    owner: str  # the principal digest, "fn:<namespace>", or ""
    key: str


def _split(store_key: str) -> _Parts:
    match = _MIDDLEWARE_KEY.fullmatch(store_key)
    if match is not None:
        return _Parts("http", match["principal"], match["key"])
    if store_key.startswith("fn:"):
        namespace, colon, key = store_key[3:].partition(":")
        if colon:
            return _Parts("fn", f"fn:{namespace}", key)
    return _Parts("other", "", store_key)


def _state(record: Record, now: float) -> str:
    if record.state is State.COMPLETED:
        return "completed"
    return "stale" if record.lease_expires_at <= now else "in progress"


def _decoded(record: Record) -> StoredResponse | TooLargeMarker | str | None:
    """The stored response of a completed middleware record; a message if it cannot be read; else ``None``."""
    if record.payload is None or _split(record.key).kind == "fn":
        return None
    try:
        return decode_response(record.payload)
    except ValueError as exc:
        return f"not a stored response ({exc})"


def _status(record: Record) -> str:
    if record.state is State.IN_PROGRESS:
        return "-"
    if _split(record.key).kind == "fn":
        return "fn"  # a function's result: no HTTP status
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        return str(response.status)
    if isinstance(response, TooLargeMarker):
        return f"{response.status}*"  # completed, but the response was too large to keep
    return "?"


def _duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``; ``-`` once past."""
    if seconds < 0:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _as_json(record: Record, now: float) -> dict[str, Any]:
    parts = _split(record.key)
    status = _status(record)
    return {
        "store_key": record.key,
        "key": parts.key,
        "kind": parts.kind,
        "principal": parts.owner if parts.kind == "http" else None,
        "namespace": parts.owner[3:] if parts.kind == "fn" else None,
        "state": record.state.value,
        "stale": record.state is State.IN_PROGRESS and record.lease_expires_at <= now,
        "status": int(status.rstrip("*")) if status.rstrip("*").isdigit() else None,
        "fingerprint": record.fingerprint,
        "created_at": record.created_at,
        "lease_expires_at": record.lease_expires_at if record.state is State.IN_PROGRESS else None,
        "expires_at": record.expires_at,
        "age_seconds": round(now - record.created_at, 3),
        "expires_in_seconds": round(record.expires_at - now, 3),
        "payload_bytes": None if record.payload is None else len(record.payload),
    }


def _table(records: list[Record], now: float) -> list[str]:
    header = ("KEY", "PRINCIPAL", "STATE", "STATUS", "AGE", "EXPIRES IN")
    rows = [header]
    for record in records:
        parts = _split(record.key)
        owner = parts.owner[:_SHORT] if parts.kind == "http" else (parts.owner or "-")
        age, expires_in = _duration(now - record.created_at), _duration(record.expires_at - now)
        rows.append((parts.key, owner, _state(record, now), _status(record), age, expires_in))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


# -- opening the store, and its errors ------------------------------------------------------------------------------


@contextmanager
def _opened(url: str) -> Iterator[SyncStore]:
    """The sync store *url* names, closed afterwards; its failures as one-line errors, never tracebacks."""
    _check_sqlite_file(url)
    try:
        store = sync_store_from_url(url)
    except MissingDependency as exc:
        raise click.ClickException(str(exc)) from None
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--store'") from None
    try:
        yield store
    except StoreError as exc:  # its message names the store, without the password
        raise click.ClickException(_one_line(str(exc))) from None
    except OSError as exc:
        msg = f"the store {redact(url)} failed: {exc}"
        raise click.ClickException(_one_line(msg)) from None
    finally:
        with suppress(StoreError, OSError):  # the failure that matters, if any, is reported above
            store.close()


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


def _check_sqlite_file(url: str) -> None:
    """A SQLite URL must name an existing database: opening one creates it, and a typo would list an empty one."""
    try:
        parsed = parse_store_url(url)
        if parsed.scheme != "sqlite":
            return
        path = SyncSQLiteStore._path_from_url(parsed, {})
    except ConfigurationError:
        return  # said when the store is opened
    if path != ":memory:" and not Path(path).is_file():
        msg = f"no SQLite database at {os.path.abspath(path)!r}"
        raise click.BadParameter(msg, param_hint="'--store'")


def _scanning(store: SyncStore) -> SyncScanningStore:
    if not isinstance(store, SyncScanningStore):
        msg = f"{type(store).__name__} cannot list its records (it has no scan())"
        raise click.ClickException(msg)
    return store


def _matching(store: SyncStore, key: str, principal: str | None) -> list[Record]:
    """The records *key* may mean: the store key itself; with *principal*, that principal's record of the
    Idempotency-Key *key*; else every record whose key part is *key* (the whole store is scanned)."""
    if principal is not None:
        principal = principal.lower()
        if not _DIGEST.fullmatch(principal):
            msg = "a principal digest is hexadecimal, at most 32 characters"
            raise click.BadParameter(msg, param_hint="'--principal'")
        if len(principal) == 32:
            record = store.get(f"{principal}:{key}")
            return [] if record is None else [record]
        candidates = _scanning(store).scan(principal)
    else:
        record = store.get(key)
        if record is not None:
            return [record]
        candidates = _scanning(store).scan()
    return [record for record in candidates if _split(record.key).key == key and _split(record.key).kind != "other"]


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _one(store: SyncStore, key: str, principal: str | None) -> Record:
    """The one record *key* names: several are listed, and a person at a terminal is asked to pick one."""
    records = _matching(store, key, principal)
    if not records:
        where = f" for principal {principal}" if principal else ""
        msg = f"no record under key {key!r}{where}"
        raise click.ClickException(msg)
    if len(records) == 1:
        return records[0]
    now = time.time()
    click.echo(f"{len(records)} records have the key {key!r}:", err=True)
    for number, line in enumerate(_table(records, now)):
        click.echo(f"{'#' if number == 0 else number:>3}  {line}", err=True)
    if not _interactive():
        msg = "give the full store key, or --principal with the principal's digest, to choose one"
        raise click.ClickException(msg)
    choice: int = click.prompt("Which one?", type=click.IntRange(1, len(records)), err=True)
    return records[choice - 1]


# -- the commands ----------------------------------------------------------------------------------------------------


def _store_option(function: Callable[..., _T]) -> Callable[..., _T]:
    return click.option(
        "--store",
        "store_url",
        metavar="URL",
        envvar="IDEMPO_STORE",
        show_envvar=True,
        required=True,
        help="The store: sqlite:///path.db, redis://host:6379/0?prefix=..., postgresql://...?table=...",
    )(function)


@click.group(name="keys")
def command() -> None:
    """Look at and maintain the records of a store.

    The middleware's records are keyed <principal digest>:<Idempotency-Key>; the @idempotent decorator's
    fn:<namespace>:<key>.
    """


@command.command(name="list")
@_store_option
@click.option("--prefix", default="", help="Only store keys that start with this (taken literally).")
@click.option(
    "--principal",
    metavar="DIGEST",
    default=None,
    help="Only this principal's records (its digest, or the start of it); --prefix then applies to the key.",
)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="At most this many records.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_records(store_url: str, prefix: str, principal: str | None, limit: int | None, as_json: bool) -> None:
    """List the live records: key, principal, state, response status, age, time left.

    STATUS is the stored response's status, '-' while in progress, 'fn' for a function's result (the
    decorator's records), and marked with '*' when the response was too large to keep. Built-in stores list in
    key order, except Redis.
    """
    if principal is not None and not _DIGEST.fullmatch(principal.lower()):
        msg = "a principal digest is hexadecimal, at most 32 characters"
        raise click.BadParameter(msg, param_hint="'--principal'")
    with _opened(store_url) as store:
        scanning = _scanning(store)
        if principal is None:
            records = list(scanning.scan(prefix, limit=limit))
        elif len(principal) == 32:
            records = list(scanning.scan(f"{principal.lower()}:{prefix}", limit=limit))
        else:
            wanted = (
                r
                for r in scanning.scan(principal.lower())
                if _split(r.key).kind == "http" and _split(r.key).key.startswith(prefix)
            )
            records = [r for _, r in zip(range(limit), wanted, strict=False)] if limit is not None else list(wanted)
    now = time.time()
    if as_json:
        click.echo(json.dumps([_as_json(record, now) for record in records], indent=2))
    elif not records:
        click.echo("no records", err=True)
    else:
        for line in _table(records, now):
            click.echo(line)


@command.command(name="show")
@_store_option
@click.argument("key")
@click.option("--principal", metavar="DIGEST", default=None, help="The principal's digest (or the start of it).")
@click.option("--body", is_flag=True, help="Print the stored body (or function result) too.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead.")
def show(store_url: str, key: str, principal: str | None, body: bool, as_json: bool) -> None:
    """Show one record: its fields, and the stored response's status and headers.

    KEY is a full store key, or an Idempotency-Key: with --principal, that principal's; without, the one record
    that has it (the store is scanned; when several do, they are listed to choose from). The body is printed
    only with --body: as text if it is UTF-8, else in base64.
    """
    with _opened(store_url) as store:
        record = _one(store, key, principal)
    now = time.time()
    if as_json:
        click.echo(json.dumps(_show_json(record, now, body=body), indent=2))
        return
    for line in _show_lines(record, now, body=body):
        click.echo(line)
    content = _body(record) if body else b""
    if content:
        text = _text(content)
        click.echo(text if text is not None else base64.b64encode(content).decode())


def _body(record: Record) -> bytes:
    """What ``--body`` prints: the response's body, or the whole payload (a function's result, an unreadable one)."""
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        return response.body
    if isinstance(response, TooLargeMarker):
        return b""
    return record.payload or b""


def _text(content: bytes) -> str | None:
    try:
        return content.decode()
    except UnicodeDecodeError:
        return None


def _show_lines(record: Record, now: float, *, body: bool) -> Iterator[str]:
    parts = _split(record.key)
    yield f"store key:    {record.key}"
    yield f"key:          {parts.key}"
    if parts.kind == "http":
        yield f"principal:    {parts.owner}"
    elif parts.kind == "fn":
        yield f"function:     {parts.owner[3:]} (an @idempotent function's result)"
    state = _state(record, now)
    if state == "stale":
        state = f"in progress, stale: its lease ran out {_duration(now - record.lease_expires_at)} ago"
    elif record.state is State.IN_PROGRESS:
        state = f"in progress, lease ends in {_duration(record.lease_expires_at - now)}"
    yield f"state:        {state}"
    yield f"fingerprint:  {record.fingerprint}"
    yield f"created:      {_when(record.created_at)} ({_duration(now - record.created_at)} ago)"
    yield f"expires:      {_when(record.expires_at)} (in {_duration(record.expires_at - now)})"
    if record.payload is None:
        return
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        yield f"status:       {response.status}"
        yield "headers:" if response.headers else "headers:      (none)"
        for name, value in response.headers:
            yield f"  {name.decode('latin-1')}: {value.decode('latin-1')}"
        yield f"body:         {_size(response.body, body=body)}"
    elif isinstance(response, TooLargeMarker):
        yield f"status:       {response.status}"
        yield "body:         not kept (the response was too large to store); retries get an error, not a replay"
    elif isinstance(response, str):
        yield f"payload:      {response}; {_size(record.payload, body=body)}"
    else:
        yield f"result:       {_size(record.payload, body=body)}"


def _size(content: bytes, *, body: bool) -> str:
    """``28 bytes (--body to print it)``; with *body*, what follows: ``28 bytes:`` or ``11 bytes, binary, in
    base64:``."""
    size = f"{len(content)} byte{'' if len(content) == 1 else 's'}"
    if not content:
        return size
    if not body:
        return f"{size} (--body to print it)"
    return f"{size}:" if _text(content) is not None else f"{size}, binary, in base64:"


def _show_json(record: Record, now: float, *, body: bool) -> dict[str, Any]:
    shown = _as_json(record, now)
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        shown["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers]
    shown["too_large"] = isinstance(response, TooLargeMarker)
    if body and record.payload is not None:
        content = _body(record)
        text = _text(content)
        shown["body"] = text
        shown["body_base64"] = base64.b64encode(content).decode() if text is None else None
    return shown


@command.command(name="delete")
@_store_option
@click.argument("key")
@click.option("--principal", metavar="DIGEST", default=None, help="The principal's digest (or the start of it).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete(store_url: str, key: str, principal: str | None, yes: bool) -> None:
    """Delete one record, whatever its state: the next request with its key runs again.

    KEY is found as in 'idempo keys show'. Deleting an in-progress record lets a retry run while the first
    attempt may still be running.
    """
    with _opened(store_url) as store:
        record = _one(store, key, principal)
        if not yes:
            click.confirm(f"Delete {record.key!r} ({_state(record, time.time())})?", abort=True, err=True)
        if not store.delete(record.key):
            msg = f"no record under key {record.key!r} any more"
            raise click.ClickException(msg)
    click.echo(f"deleted {record.key}")


@command.command(name="purge")
@_store_option
def purge(store_url: str) -> None:
    """Remove the expired records now, and print how many.

    Expired records are never used, but SQLite and PostgreSQL keep them until purged (run this from a scheduled
    job); Redis drops them on its own (0).
    """
    with _opened(store_url) as store:
        count = store.purge_expired()
    click.echo(f"purged {count} expired record{'' if count == 1 else 's'}")
