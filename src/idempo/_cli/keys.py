"""``idempo keys``: look at and maintain the records of a store (``list``, ``show``, ``delete``, ``resolve``,
``purge``).

Every subcommand opens the store its ``--store`` URL names (or ``$IDEMPO_STORE``) as a sync store, runs one
operation and closes it. Listing needs the optional ``scan`` capability (every built-in store has it).

Whatever comes from the store (keys, header values, bodies, fingerprints) is printed with its control characters
escaped (:func:`safe`): a stored response is the client's bytes, and must never drive the operator's terminal.

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
from pathlib import Path
from typing import TypeVar

import click

from .._core.codec import (
    OutcomeUnknownMarker,
    encode_not_stored,
)
from .._core.errors import ConfigurationError, MissingDependency, StoreError
from .._core.records import Existing, Record
from ..stores import SyncScanningStore, SyncStore, parse_store_url, redact, sync_store_from_url
from ..stores.sqlite import SyncSQLiteStore
from .records import (
    ANONYMOUS,
    ANONYMOUS_LABEL,
    as_text,
    marker_of,
    record_json,
    safe,
    show_json,
    show_lines,
    split_key,
    state_text,
    stored_body,
    table_lines,
    when_text,
)

_T = TypeVar("_T")
_MIDDLEWARE_KEY = re.compile(r"(?P<principal>[0-9a-f]{32}):(?P<key>.*)", re.DOTALL)
_DIGEST = re.compile(r"[0-9a-f]{1,32}")
_SHORT = 8  # characters of a principal digest shown in the table
_RESOLVE_LEASE = 60.0  # seconds ``resolve --ran`` holds the key between its claim and its complete, at most

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
    """The records *key* may mean: the store key itself; with *principal* (checked by :func:`_principal_value`),
    that principal's record of the Idempotency-Key *key*; else every record whose key part is *key* (the whole
    store is scanned)."""
    if principal is not None:
        if len(principal) == 32:
            record = store.get(f"{principal}:{key}")
            return [] if record is None else [record]
        candidates = _scanning(store).scan(principal)
    else:
        record = store.get(key)
        if record is not None:
            return [record]
        candidates = _scanning(store).scan()
    return [
        record for record in candidates if split_key(record.key).key == key and split_key(record.key).kind != "other"
    ]


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _one(store: SyncStore, key: str, principal: str | None) -> Record:
    """The one record *key* names: several are listed, and a person at a terminal is asked to pick one."""
    records = _matching(store, key, principal)
    if not records:
        where = f" for principal {safe(principal)}" if principal else ""
        msg = f"no record under key {safe(key)!r}{where}"
        raise click.ClickException(msg)
    if len(records) == 1:
        return records[0]
    now = time.time()
    click.echo(f"{len(records)} records have the key {safe(key)!r}:", err=True)
    for number, line in enumerate(table_lines(records, now)):
        click.echo(f"{'#' if number == 0 else number:>3}  {line}", err=True)
    if not _interactive():
        msg = "give the full store key, or --principal with the principal's digest, to choose one"
        raise click.ClickException(msg)
    choice: int = click.prompt("Which one?", type=click.IntRange(1, len(records)), err=True)
    return records[choice - 1]


# -- the commands ----------------------------------------------------------------------------------------------------


def _principal_value(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """``--principal``: a digest or its first characters, lower-cased; ``anonymous`` for the anonymous one's."""
    if value is None:
        return None
    if value.lower() in ("anonymous", ANONYMOUS_LABEL):
        return ANONYMOUS
    if not _DIGEST.fullmatch(value.lower()):
        msg = "a principal digest is hexadecimal, at most 32 characters (or 'anonymous')"
        raise click.BadParameter(msg)
    return value.lower()


def _principal_option(help: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    return click.option("--principal", metavar="DIGEST", default=None, callback=_principal_value, help=help)


_ONE_PRINCIPAL = "The principal's digest, or its first characters ('idempo keys list' shows 8); 'anonymous' too."


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
@_principal_option(
    "Only this principal's records: its digest, or its first characters, as the PRINCIPAL column shows them; "
    "'anonymous' for the anonymous callers'. --prefix then applies to the key."
)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="At most this many records.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_records(store_url: str, prefix: str, principal: str | None, limit: int | None, as_json: bool) -> None:
    """List the live records: key, principal, state, response status, age, time left.

    PRINCIPAL is whose record it is: the first 8 characters of a digest (SHA-256) of the caller the middleware
    filed it under, so that the caller is never stored in clear. By default the caller is the authenticated user
    an auth middleware set (scope["user"]), else the Authorization header; or what the app's principal= function
    returns. '(anonymous)' marks the requests that had neither: they all share one namespace (digest e3b0c442...).
    'fn:<namespace>' marks a decorated function's result. --principal takes a digest's first characters, or
    'anonymous'; --json gives the whole digest, and "anonymous": true or false.

    STATE is 'in progress', 'stale' (its lease ran out), 'completed', 'completed, response not stored (REASON)', or
    'outcome unknown (first answered STATUS)' (see 'idempo keys resolve'). STATUS is the stored response's status,
    '-' when there is none (in progress, outcome unknown), 'fn' for a function's result (the decorator's records),
    and marked with '*' when the response was not kept. Built-in stores list in key order, except Redis.
    """
    with _opened(store_url) as store:
        scanning = _scanning(store)
        if principal is None:
            records = list(scanning.scan(prefix, limit=limit))
        elif len(principal) == 32:
            records = list(scanning.scan(f"{principal}:{prefix}", limit=limit))
        else:
            wanted = (
                r
                for r in scanning.scan(principal)
                if split_key(r.key).kind == "http" and split_key(r.key).key.startswith(prefix)
            )
            records = [r for _, r in zip(range(limit), wanted, strict=False)] if limit is not None else list(wanted)
    now = time.time()
    if as_json:
        click.echo(json.dumps([record_json(record, now) for record in records], indent=2))
    elif not records:
        click.echo("no records", err=True)
    else:
        for line in table_lines(records, now):
            click.echo(line)


@command.command(name="show")
@_store_option
@click.argument("key")
@_principal_option(_ONE_PRINCIPAL)
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
        click.echo(json.dumps(show_json(record, now, body=body), indent=2))
        return
    for line in show_lines(record, now, body=body):
        click.echo(line)
    content = stored_body(record) if body else b""
    if content:
        text = as_text(content)
        click.echo(safe(text, multiline=True) if text is not None else base64.b64encode(content).decode())


@command.command(name="delete")
@_store_option
@click.argument("key")
@_principal_option(_ONE_PRINCIPAL)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete(store_url: str, key: str, principal: str | None, yes: bool) -> None:
    """Delete one record, whatever its state: the next request with its key runs again.

    KEY is found as in 'idempo keys show'. Deleting an in-progress record lets a retry run while the first
    attempt may still be running.
    """
    with _opened(store_url) as store:
        record = _one(store, key, principal)
        if not yes:
            click.confirm(f"Delete {safe(record.key)!r} ({state_text(record, time.time())})?", abort=True, err=True)
        if not store.delete(record.key):
            msg = f"no record under key {safe(record.key)!r} any more"
            raise click.ClickException(msg)
    click.echo(f"deleted {safe(record.key)}")


@command.command(name="resolve")
@_store_option
@click.argument("key")
@_principal_option(_ONE_PRINCIPAL)
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
        shown, state = safe(record.key), state_text(record, now)
        if not isinstance(marker_of(record), OutcomeUnknownMarker) and not force:
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
    click.echo(f"resolved {shown}: ran; retries get 410 response-not-stored until {when_text(time.time() + keep)}")


def _record_ran(store: SyncStore, record: Record, status: int, ttl: float) -> None:
    """Replace *record* with the "not stored" marker of an operation that ran, through the Store protocol alone.

    The protocol cannot overwrite a completed record (``complete`` needs the owner's token and an in-progress
    claim), so this deletes it, claims the key again at once with the record's fingerprint and a fresh token, and
    completes that claim with the marker. A retry that arrives before the delete gets the 503 it got before; one
    between the claim and the complete, a 409 (and then the 410). Only a request that lands in the one round trip
    between the delete and the claim finds the key free and runs the operation again: the claim then finds its
    record, and this says so instead of writing anything.
    """
    shown = safe(record.key)
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
            f"(now {state_text(claim.record, time.time())}): it is running the operation again; nothing was written"
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
