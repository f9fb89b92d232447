"""What the SQLite stores share: the options, the SQL, each operation as a plain function of a ``sqlite3`` connection,
and the plan that tries an operation until its deadline. Strictly private (see ``sqlite.py``'s docstring).

An operation's statements run in one attempt that never yields: a transaction that holds the write lock must not
wait for anything, so an attempt is one effect. What happens between attempts (the pauses, the deadline, the error
when it has passed) is a plan (:mod:`idempo._core.plans`), performed by either store.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .._core.bound import Target
from .._core.errors import ConfigurationError, StoreError
from .._core.records import Acquired, Claim, Existing, Record, new_token
from ._rows import COMPLETED, IN_PROGRESS, keyed_record_from_row, record_from_row
from ._scan import Page, keyset_plan, prefix_end
from ._sqlite_connections import Busy, Database
from ._url import StoreURL

__all__ = ["Attempt", "Pause", "SQLiteOperations"]

T = TypeVar("T")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_COLUMNS = "key, state, fingerprint, token, created_at, lease_expires_at, expires_at, payload"
# Seconds between two attempts of an operation that found the database locked: the steps of SQLite's own busy
# handler (sqliteDefaultBusyCallback), then 100 ms until the operation's deadline.
_PAUSES = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)
_SCAN_PAGE = 100  # records per statement of a scan (payloads included: each may be large)
# Keys per batch of a purge: each batch is a write transaction of its own, which holds the write lock (every other
# writer of the file waits) for about a millisecond.
_PURGE_BATCH = 1000


class Attempt(NamedTuple):
    """Effect: run *operation* (a function of a connection) with *args*, once. Its result, or :class:`Busy` if it
    found the database locked or its *deadline* passed before its turn; *inline*: it may run on the event loop's
    thread."""

    operation: Callable[..., Any]
    args: tuple[Any, ...]
    deadline: float
    inline: bool


Pause = float
"""Effect: wait this many seconds before the next attempt."""

_Plan = Generator[Attempt | Pause, Any, T]
"""An operation's attempts, written once: performed by either store."""


class SQLiteOperations:
    """What :class:`SQLiteStore` and :class:`SyncSQLiteStore` share: the options, the SQL, the operations (each a
    plain function of a ``sqlite3`` connection) and the plan that tries one until its deadline. Strictly private."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str,
        busy_timeout: float,
        synchronous: str,
        clock: Callable[[], float],
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            msg = f"table name {table!r} must be letters, digits and underscores"
            raise ConfigurationError(msg)
        if synchronous.upper() not in _SYNCHRONOUS:
            msg = f"synchronous={synchronous!r}; expected one of {', '.join(_SYNCHRONOUS)}"
            raise ConfigurationError(msg)
        if busy_timeout < 0:
            msg = f"busy_timeout must not be negative, not {busy_timeout}"
            raise ConfigurationError(msg)
        self._path = os.fspath(path)
        if self._path != ":memory:":
            # Connections open lazily (and again after a fork): pin a relative path to today's working directory.
            self._path = os.path.abspath(self._path)
        if self._path != ":memory:" and not Path(self._path).resolve().parent.is_dir():
            msg = f"the directory of SQLite store {self._path!r} does not exist"
            raise ConfigurationError(msg)
        self._table = table
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._clock = clock
        self._database = Database(self._path, table, self._synchronous)
        # The claim's read: every column but the key, which the caller has (one column less to read on each claim).
        self._sql_claim_read = f"SELECT {_COLUMNS.partition(', ')[2]} FROM {table} WHERE key = ?"
        self._sql_claim_write = (
            f"INSERT OR REPLACE INTO {table} ({_COLUMNS}) VALUES (?, {IN_PROGRESS}, ?, ?, ?, ?, ?, NULL)"
        )
        # A key no record holds, claimed in one statement, atomic on its own: it inserts nothing if a record
        # appeared since the read.
        self._sql_claim_new = (
            f"INSERT INTO {table} ({_COLUMNS}) VALUES (?, {IN_PROGRESS}, ?, ?, ?, ?, ?, NULL) ON CONFLICT DO NOTHING"
        )
        self._sql_renew = (
            f"UPDATE {table} SET lease_expires_at = ? "
            f"WHERE key = ? AND token = ? AND state = {IN_PROGRESS} AND expires_at > ?"
        )
        # Named parameters: the application runs this very statement inside its own transaction too
        # (idempo.transactions), through whichever driver it uses.
        self._sql_complete = (
            f"UPDATE {table} SET state = {COMPLETED}, token = '', payload = :payload, lease_expires_at = :now, "
            f"expires_at = :now + :ttl "
            f"WHERE key = :key AND token = :token AND state = {IN_PROGRESS} AND expires_at > :now"
        )
        # The same, with positional parameters: the store's own (cheaper to bind).
        self._sql_complete_own = (
            f"UPDATE {table} SET state = {COMPLETED}, token = '', payload = ?, lease_expires_at = ?, expires_at = ? "
            f"WHERE key = ? AND token = ? AND state = {IN_PROGRESS} AND expires_at > ?"
        )
        self._sql_release = (
            f"DELETE FROM {table} WHERE key = ? AND token = ? AND state = {IN_PROGRESS} AND expires_at > ?"
        )
        self._sql_get = f"SELECT {_COLUMNS} FROM {table} WHERE key = ? AND expires_at > ?"
        self._sql_delete = f"DELETE FROM {table} WHERE key = ?"
        # A purge, one batch of keys at a time: where the batch ends (the last of the next _PURGE_BATCH keys), then
        # the expired rows up to there; the first batch from the table's start.
        self._sql_purge_end_first = f"SELECT max(key) FROM (SELECT key FROM {table} ORDER BY key LIMIT ?)"
        self._sql_purge_end = f"SELECT max(key) FROM (SELECT key FROM {table} WHERE key > ? ORDER BY key LIMIT ?)"
        self._sql_purge_first = f"DELETE FROM {table} WHERE key <= ? AND expires_at <= ?"
        self._sql_purge = f"DELETE FROM {table} WHERE key > ? AND key <= ? AND expires_at <= ?"
        self._scan_page_size = _SCAN_PAGE

    def _transaction_target(self) -> Target:
        """Where this store keeps its records, for a transaction of the application's on the same file
        (:mod:`idempo.transactions`)."""
        return Target("sqlite", (os.path.realpath(self._path),), self._sql_complete, self._clock, repr(self))

    @staticmethod
    def _path_from_url(url: StoreURL, options: dict[str, Any]) -> str:
        """The file a ``sqlite:`` URL names; fills *options* with the query options both stores take."""
        if url.netloc:
            msg = f"a SQLite URL has no host: write 'sqlite:///{url.netloc}{url.path}' for a relative path"
            raise ConfigurationError(msg)
        path = url.path[1:] if url.path.startswith("/") else url.path
        if not path:
            msg = "a SQLite URL needs a file: 'sqlite:///idempo.db' (relative) or 'sqlite:////var/lib/idempo.db'"
            raise ConfigurationError(msg)
        options.setdefault("table", url.option("table", "idempo_records"))
        options.setdefault("busy_timeout", url.float_option("busy_timeout", 5.0))
        options.setdefault("synchronous", url.option("synchronous", "NORMAL"))
        return path

    # -- trying an operation until its deadline: a plan ------------------------------------------------------

    def _attempt(self, operation: Callable[..., Any], args: tuple[Any, ...], inline: bool = True) -> Attempt:
        """*operation*'s attempt, its deadline *busy_timeout* from now."""
        return Attempt(operation, args, time.monotonic() + self._busy_timeout, inline)

    def _attempts(self, attempt: Attempt, failed: Busy | None = None) -> _Plan[Any]:
        """*attempt*, made until it is not :class:`Busy`, pausing between attempts, until its deadline. *failed*:
        the first attempt was made already (outside the plan: see ``sqlite.py``), and failed so."""
        tries, cause = 0, None
        while True:
            if failed is None:
                try:
                    return (yield attempt)
                except Busy as busy:
                    failed = busy
            cause = failed.cause or cause
            failed = None
            yield self._pause(attempt.deadline, tries, cause)
            tries += 1

    def _pause(self, deadline: float, tries: int, cause: sqlite3.Error | None) -> float:
        """Seconds to wait before the next attempt of an operation that found the database locked (*cause*, the
        last ``SQLITE_BUSY``; ``None`` if it never got its turn).

        Raises:
            StoreError: the operation's deadline has passed.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if cause is None:
                msg = f"SQLite store {self._path!r}: not run: busy_timeout={self._busy_timeout:g} s ran out in a queue"
            else:
                msg = f"SQLite store {self._path!r}: {type(cause).__name__}: {cause} (for {self._busy_timeout:g} s)"
            raise StoreError(msg) from cause
        return min(_PAUSES[min(tries, len(_PAUSES) - 1)], remaining)

    def _scan_plan(self, prefix: str, limit: int | None) -> Generator[Attempt | Pause | Record, Any, None]:
        """A scan: pages of records in key order, each page one operation (its own attempts and deadline)."""
        return keyset_plan(limit, self._scan_page_size, lambda page: self._page(prefix, page))

    def _purge_plan(self) -> _Plan[int]:
        """A purge: the table in key order, :data:`_PURGE_BATCH` keys at a time, each batch one operation (its own
        attempts and deadline), on the store's thread; the rows expired when the purge started are deleted. A table
        of a million records is a thousand short write transactions, between which other writers take their turn,
        rather than one that would hold the write lock while it deletes them all."""
        now = self._clock()
        purged = 0
        after: str | None = None
        while True:
            attempt = self._attempt(self._purge_batch, (after, now), inline=False)
            batch: tuple[int, str | None] = yield from self._attempts(attempt)
            purged += batch[0]
            after = batch[1]
            if after is None:
                return purged

    def _page(self, prefix: str, page: Page) -> _Plan[list[Record]]:
        result: list[Record] = yield from self._attempts(self._attempt(self._scan_page, (prefix, page)))
        return result

    # -- the operations: plain functions of a connection, run by either store -------------------------------

    def _claim(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, lease: float, ttl: float, token: str | None = None
    ) -> Claim:
        now = self._clock()
        # A live record seen by a plain read is a safe answer: completed records never change, and an
        # in-progress one was in progress at the moment of the read.
        row = conn.execute(self._sql_claim_read, (key,)).fetchone()
        if row is None:
            # No record: ours, in one statement, unless one appeared since the read (then as below).
            if token is None:
                token = new_token()
            if conn.execute(self._sql_claim_new, (key, fingerprint, token, now, now + lease, now + ttl)).rowcount:
                return Acquired(token)
        elif row[5] > now and (row[0] == COMPLETED or row[4] > now):
            return Existing(keyed_record_from_row(key, row))
        # An expired record or a stale claim, to take over (or a record that appeared since the read): under the
        # write lock, so that two processes can never both take it.
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = self._clock()
            row = conn.execute(self._sql_claim_read, (key,)).fetchone()
            if row is not None and row[5] > now and (row[0] == COMPLETED or row[4] > now):
                result: Claim = Existing(keyed_record_from_row(key, row))
            else:
                if token is None:
                    token = new_token()
                conn.execute(self._sql_claim_write, (key, fingerprint, token, now, now + lease, now + ttl))
                result = Acquired(token)
            conn.execute("COMMIT")
        except BaseException:
            # COMMIT too may fail (busy, on a database that is not in WAL mode): never leave the connection
            # inside a transaction that holds the write lock.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _renew(self, conn: sqlite3.Connection, key: str, token: str, lease: float) -> bool:
        now = self._clock()
        return conn.execute(self._sql_renew, (now + lease, key, token, now)).rowcount == 1

    def _complete(self, conn: sqlite3.Connection, key: str, token: str, payload: bytes, ttl: float) -> bool:
        now = self._clock()
        # expires_at = now + ttl as _sql_complete computes it in SQL (a double sum either way).
        return conn.execute(self._sql_complete_own, (payload, now, now + float(ttl), key, token, now)).rowcount == 1

    def _release(self, conn: sqlite3.Connection, key: str, token: str) -> bool:
        return conn.execute(self._sql_release, (key, token, self._clock())).rowcount == 1

    def _get(self, conn: sqlite3.Connection, key: str) -> Record | None:
        row = conn.execute(self._sql_get, (key, self._clock())).fetchone()
        return None if row is None else record_from_row(row)

    def _delete(self, conn: sqlite3.Connection, key: str) -> bool:
        return conn.execute(self._sql_delete, (key,)).rowcount == 1

    def _purge_batch(self, conn: sqlite3.Connection, after: str | None, now: float) -> tuple[int, str | None]:
        """One batch of a purge: of the next :data:`_PURGE_BATCH` keys after *after* (``None``: from the first), the
        rows expired by *now* deleted; how many, and the batch's last key (``None``: the table has no more)."""
        start: tuple[str, ...]
        if after is None:
            find_end, delete, start = self._sql_purge_end_first, self._sql_purge_first, ()
        else:
            find_end, delete, start = self._sql_purge_end, self._sql_purge, (after,)
        end = conn.execute(find_end, (*start, _PURGE_BATCH)).fetchone()[0]
        if end is None:
            return 0, None
        return conn.execute(delete, (*start, end, now)).rowcount, end

    def _scan_page(self, conn: sqlite3.Connection, prefix: str, page: Page) -> list[Record]:
        """One page of a scan: a range of the primary key's index, ``prefix <= key < prefix_end(prefix)``
        (SQLite compares text byte by byte in UTF-8, which is code point order), after ``page.after``."""
        clauses: list[str] = ["expires_at > ?"]
        params: list[object] = [self._clock()]
        if page.after is None:
            clauses.append("key >= ?")
            params.append(prefix)
        else:
            clauses.append("key > ?")
            params.append(page.after)
        end = prefix_end(prefix)
        if end is not None:
            clauses.append("key < ?")
            params.append(end)
        query = f"SELECT {_COLUMNS} FROM {self._table} WHERE {' AND '.join(clauses)} ORDER BY key LIMIT ?"
        return [record_from_row(row) for row in conn.execute(query, (*params, page.size))]
