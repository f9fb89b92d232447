"""``idempo keys``: look at and maintain the records of a store (``list``, ``show``, ``delete``, ``resolve``,
``purge``).

Every subcommand opens the store its ``--store`` URL names (or ``$IDEMPO_STORE``) as a sync store, runs one
operation and closes it. Listing needs the optional ``scan`` capability (every built-in store has it).

Whatever comes from the store (keys, header values, bodies, fingerprints) is printed with its control characters
escaped (:func:`_safe`): a stored response is the client's bytes, and must never drive the operator's terminal.

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

from .._core.codec import (
    OutcomeUnknownMarker,
    StoredResponse,
    TooLargeMarker,
    decode_marker,
    decode_response,
    decode_value,
    encode_not_stored,
)
from .._core.errors import ConfigurationError, MissingDependency, StoreError
from .._core.records import Existing, Record, State
from ..stores import SyncScanningStore, SyncStore, parse_store_url, redact, sync_store_from_url
from ..stores.sqlite import SyncSQLiteStore

_T = TypeVar("_T")
_MIDDLEWARE_KEY = re.compile(r"(?P<principal>[0-9a-f]{32}):(?P<key>.*)", re.DOTALL)
_DIGEST = re.compile(r"[0-9a-f]{1,32}")
_SHORT = 8  # characters of a principal digest shown in the table
_RESOLVE_LEASE = 60.0  # seconds ``resolve --ran`` holds the key between its claim and its complete, at most

# What must never reach the terminal raw: C0 controls and DEL, C1 controls (U+0080-U+009F: 0x9b is a CSI of its own
# on some terminals), the bidirectional marks, embeddings, overrides and isolates (text that reads otherwise than it
# is), and the line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _safe(text: str, *, multiline: bool = False) -> str:
    """*text* from the store, fit for a terminal: every control character written as an escape, ``\\x1b`` or
    ``\\u202e``; with *multiline* (a body shown as text), newlines and tabs are kept."""
    return (_UNSAFE_IN_TEXT if multiline else _UNSAFE).sub(_escape, text)


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


def _marker(record: Record) -> TooLargeMarker | OutcomeUnknownMarker | None:
    """The marker a completed record holds in place of its response or result, if it holds one."""
    if record.state is not State.COMPLETED or record.payload is None:
        return None
    return decode_marker(record.payload)


def _state(record: Record, now: float) -> str:
    """The record's state, for a person: ``in progress``, ``stale``, ``completed``, ``outcome unknown (first
    answered 504)`` or ``completed, response not stored (too_large)``."""
    if record.state is State.IN_PROGRESS:
        return "stale" if record.lease_expires_at <= now else "in progress"
    marker = _marker(record)
    if isinstance(marker, OutcomeUnknownMarker):
        return "outcome unknown" + (f" (first answered {marker.status})" if marker.status else "")
    if isinstance(marker, TooLargeMarker):
        what = "result" if _split(record.key).kind == "fn" else "response"
        return f"completed, {what} not stored ({marker.reason})"
    return "completed"


def _decoded(record: Record) -> StoredResponse | TooLargeMarker | OutcomeUnknownMarker | str | None:
    """The stored response of a completed middleware record; a message if it cannot be read; else ``None``."""
    if record.payload is None or _split(record.key).kind == "fn":
        return None
    try:
        return decode_response(record.payload)
    except ValueError as exc:
        return f"not a stored response ({exc})"


def _status(record: Record) -> str:
    if record.state is State.IN_PROGRESS or isinstance(_marker(record), OutcomeUnknownMarker):
        return "-"  # no response stored: none yet, or none to be had
    if _split(record.key).kind == "fn":
        return "fn"  # a function's result: no HTTP status
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        return str(response.status)
    if isinstance(response, TooLargeMarker):
        return f"{response.status}*"  # completed, but the response was not kept
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
    marker = _marker(record)
    unknown = isinstance(marker, OutcomeUnknownMarker)
    return {
        "store_key": record.key,
        "key": parts.key,
        "kind": parts.kind,
        "principal": parts.owner if parts.kind == "http" else None,
        "namespace": parts.owner[3:] if parts.kind == "fn" else None,
        "state": "outcome_unknown" if unknown else record.state.value,
        "state_text": _state(record, now),
        "stale": record.state is State.IN_PROGRESS and record.lease_expires_at <= now,
        "status": int(status.rstrip("*")) if status.rstrip("*").isdigit() else None,
        "first_status": (marker.status or None) if isinstance(marker, OutcomeUnknownMarker) else None,
        "not_stored_reason": marker.reason if isinstance(marker, TooLargeMarker) else None,
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
        rows.append((_safe(parts.key), _safe(owner), _state(record, now), _status(record), age, expires_in))
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
        where = f" for principal {_safe(principal)}" if principal else ""
        msg = f"no record under key {_safe(key)!r}{where}"
        raise click.ClickException(msg)
    if len(records) == 1:
        return records[0]
    now = time.time()
    click.echo(f"{len(records)} records have the key {_safe(key)!r}:", err=True)
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
    """Look at and maintain the records of a store, and resolve the requests whose outcome is unknown.

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

    STATE is 'in progress', 'stale' (its lease ran out), 'completed', 'completed, response not stored (REASON)', or
    'outcome unknown (first answered STATUS)' (see 'idempo keys resolve'). STATUS is the stored response's status,
    '-' when there is none (in progress, outcome unknown), 'fn' for a function's result (the decorator's records),
    and marked with '*' when the response was not kept. Built-in stores list in key order, except Redis.
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
        click.echo(_safe(text, multiline=True) if text is not None else base64.b64encode(content).decode())


def _body(record: Record) -> bytes:
    """What ``--body`` prints: the response's body, a function's serialised result, or the whole payload (an
    unreadable one); nothing for a marker."""
    payload = record.payload or b""
    if _marker(record) is not None:
        return b""
    if _split(record.key).kind == "fn":
        with suppress(ValueError):  # a result the decorator framed; else shown whole
            value = decode_value(payload)
            return value if isinstance(value, bytes) else b""
        return payload
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        return response.body
    return payload


def _text(content: bytes) -> str | None:
    try:
        return content.decode()
    except UnicodeDecodeError:
        return None


def _show_lines(record: Record, now: float, *, body: bool) -> Iterator[str]:
    parts = _split(record.key)
    yield f"store key:    {_safe(record.key)}"
    yield f"key:          {_safe(parts.key)}"
    if parts.kind == "http":
        yield f"principal:    {parts.owner}"
    elif parts.kind == "fn":
        yield f"function:     {_safe(parts.owner[3:])} (an @idempotent function's result)"
    state = _state(record, now)
    if state == "stale":
        state = f"in progress, stale: its lease ran out {_duration(now - record.lease_expires_at)} ago"
    elif record.state is State.IN_PROGRESS:
        state = f"in progress, lease ends in {_duration(record.lease_expires_at - now)}"
    yield f"state:        {state}"
    yield f"fingerprint:  {_safe(record.fingerprint)}"
    yield f"created:      {_when(record.created_at)} ({_duration(now - record.created_at)} ago)"
    yield f"expires:      {_when(record.expires_at)} (in {_duration(record.expires_at - now)})"
    if record.payload is None:
        return
    marker = _marker(record)
    if isinstance(marker, OutcomeUnknownMarker):
        yield (
            "retries get:  503 outcome-unknown, nothing runs, until the record expires or is resolved "
            "(idempo keys resolve --ran or --not-run)"
        )
        return
    if isinstance(marker, TooLargeMarker):
        if parts.kind != "fn":
            yield f"status:       {marker.status}"
        what = "result" if parts.kind == "fn" else "body"
        yield f"{what + ':':<14}not kept ({marker.reason}); retries get a 410 response-not-stored, not a replay"
        return
    response = _decoded(record)
    if isinstance(response, StoredResponse):
        yield f"status:       {response.status}"
        yield "headers:" if response.headers else "headers:      (none)"
        for name, value in response.headers:
            yield f"  {_safe(name.decode('latin-1'))}: {_safe(value.decode('latin-1'))}"
        yield f"body:         {_size(response.body, body=body)}"
    elif isinstance(response, str):
        yield f"payload:      {_safe(response)}; {_size(record.payload, body=body)}"
    else:
        yield f"result:       {_size(_body(record), body=body)}"


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
    marker = _marker(record)
    shown["too_large"] = isinstance(marker, TooLargeMarker) and marker.reason == "too_large"
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
            click.confirm(f"Delete {_safe(record.key)!r} ({_state(record, time.time())})?", abort=True, err=True)
        if not store.delete(record.key):
            msg = f"no record under key {_safe(record.key)!r} any more"
            raise click.ClickException(msg)
    click.echo(f"deleted {_safe(record.key)}")


@command.command(name="resolve")
@_store_option
@click.argument("key")
@click.option("--principal", metavar="DIGEST", default=None, help="The principal's digest (or the start of it).")
@click.option("--ran", is_flag=True, help="The operation did happen: retries get a 410 response-not-stored.")
@click.option("--not-run", is_flag=True, help="It did not happen: the record is deleted, and a retry runs it.")
@click.option(
    "--status",
    type=click.IntRange(100, 999),
    default=None,
    help="With --ran: the status the operation had (retries see it as original_status). [default: 200]",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --ran: keep the record this long from now, instead of until it was due to expire.",
)
@click.option("--force", is_flag=True, help="Resolve a record that is not of unknown outcome too.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def resolve(
    store_url: str,
    key: str,
    principal: str | None,
    ran: bool,
    not_run: bool,
    status: int | None,
    ttl: float | None,
    force: bool,
    yes: bool,
) -> None:
    """Settle a request whose outcome is unknown, once you know whether its operation happened.

    KEY is found as in 'idempo keys show', and must be in the "outcome unknown" state (unless --force). With
    --ran, the record becomes "completed, response not stored (operator)": every retry gets a 410
    response-not-stored (with --status as its original_status), never a second run, until it expires. With
    --not-run, the record is deleted: the next request with its key runs the operation.
    """
    if ran == not_run:
        msg = "give exactly one of --ran (it happened) and --not-run (it did not)"
        raise click.UsageError(msg)
    if not_run and (status is not None or ttl is not None):
        msg = "--status and --ttl go with --ran"
        raise click.UsageError(msg)
    with _opened(store_url) as store:
        record = _one(store, key, principal)
        now = time.time()
        shown, state = _safe(record.key), _state(record, now)
        if not isinstance(_marker(record), OutcomeUnknownMarker) and not force:
            msg = f"{shown!r} is {state}, not of unknown outcome; --force resolves it all the same"
            raise click.ClickException(msg)
        if not yes:
            verdict = "it ran (retries get 410)" if ran else "it did not run (the record is deleted)"
            click.confirm(f"Resolve {shown!r} ({state}): {verdict}?", abort=True, err=True)
        if not_run:
            if not store.delete(record.key):
                msg = f"no record under key {shown!r} any more"
                raise click.ClickException(msg)
            click.echo(f"resolved {shown}: not run; the record is deleted, and the next request with its key runs")
            return
        keep = ttl if ttl is not None else max(1.0, record.expires_at - now)
        _record_ran(store, record, 200 if status is None else status, keep)
    click.echo(f"resolved {shown}: ran; retries get 410 response-not-stored until {_when(time.time() + keep)}")


def _record_ran(store: SyncStore, record: Record, status: int, ttl: float) -> None:
    """Replace *record* with the "not stored" marker of an operation that ran, through the Store protocol alone.

    The protocol cannot overwrite a completed record (``complete`` needs the owner's token and an in-progress
    claim), so this deletes it, claims the key again at once with the record's fingerprint and a fresh token, and
    completes that claim with the marker. A retry that arrives before the delete gets the 503 it got before; one
    between the claim and the complete, a 409 (and then the 410). Only a request that lands in the one round trip
    between the delete and the claim finds the key free and runs the operation again: the claim then finds its
    record, and this says so instead of writing anything.
    """
    shown = _safe(record.key)
    store.delete(record.key)
    try:
        claim = store.claim(record.key, record.fingerprint, lease=min(_RESOLVE_LEASE, ttl), ttl=ttl)
    except StoreError as exc:
        msg = (
            f"{_one_line(str(exc))}: the record of {shown!r} was deleted but could not be written again: the next "
            "request with its key will run the operation"
        )
        raise click.ClickException(msg) from None
    if isinstance(claim, Existing):
        msg = (
            f"a request with the key {shown!r} arrived between this command's delete and its claim, and took the key "
            f"(now {_state(claim.record, time.time())}): it is running the operation again; nothing was written"
        )
        raise click.ClickException(msg)
    try:
        completed = store.complete(record.key, claim.token, encode_not_stored(status, "operator"), ttl=ttl)
    except StoreError as exc:
        completed, failure = False, _one_line(str(exc))
    else:
        failure = "the claim was taken over"
    if not completed:
        msg = (
            f"{failure}: {shown!r} is claimed (in progress) for {min(_RESOLVE_LEASE, ttl):.0f} s but not resolved; "
            "run this command again with --force before then"
        )
        raise click.ClickException(msg)


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
