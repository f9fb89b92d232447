"""The PostgreSQL stores' SQL, written once per table. Strictly private (see ``postgres.py``'s docstring).

Every statement reads *now* from the server's clock (``statement_timestamp()``), unless the store was given a clock
(tests); each is one round trip, and the claim is one statement in three parts (``live``, ``taken``, and what it
returns).

Each statement is rendered once, with named parameters (``%(key)s``: psycopg, for the sync store), and each of those
is turned into positional parameters (``$1``: asyncpg, for the async store) by :func:`positional`: one SQL source.
"""

from __future__ import annotations

import re

from psycopg import sql

from ._rows import COMPLETED, IN_PROGRESS
from ._scan import LIKE_ESCAPE

__all__ = ["Statements", "positional"]

# The server's clock, unless a clock was given (tests): then the parameter %(now)s. statement_timestamp(), not
# clock_timestamp(): it is STABLE, so that "expires_at <= now" can be an index condition.
_NOW = sql.SQL("COALESCE(%(now)s::float8, extract(epoch FROM statement_timestamp())::float8)")
_NAMED = re.compile(rb"%\((\w+)\)s|%%")
_NOW_CAST = "COALESCE(CAST(%(now)s AS float8), extract(epoch FROM statement_timestamp())::float8)"


def positional(query: bytes) -> tuple[str, tuple[str, ...]]:
    """*query*, written with psycopg's named parameters, in PostgreSQL's own positional style: ``$1`` for the first
    name, ``$2`` for the next new one..., and the names in that order (an argument list is made of a parameter
    dictionary as ``[params[name] for name in names]``)."""
    names: list[str] = []

    def number(match: re.Match[bytes]) -> bytes:
        if match.group(0) == b"%%":
            return b"%"
        name = match.group(1).decode()
        if name not in names:
            names.append(name)
        return b"$%d" % (names.index(name) + 1)

    return _NAMED.sub(number, query).decode(), tuple(names)


class Statements:
    """The store's SQL, written once per table. Plain ``bytes``, so that psycopg can prepare them as they are;
    a synchronous runner could execute the very same statements."""

    def __init__(self, table: str) -> None:
        t = sql.Identifier(table)
        cols = sql.SQL("key, state, fingerprint, token, created_at, lease_expires_at, expires_at, payload")
        fmt: dict[str, sql.Composable] = {"t": t, "cols": cols, "now": _NOW}

        def render(template: str, **extra: sql.Composable) -> bytes:
            return sql.SQL(template).format(**{**fmt, **extra}).as_bytes(None)

        self.create = [
            render(
                "CREATE TABLE IF NOT EXISTS {t} ("
                " key text PRIMARY KEY,"
                " state smallint NOT NULL,"
                " fingerprint text NOT NULL,"
                " token text NOT NULL,"
                " created_at double precision NOT NULL,"
                " lease_expires_at double precision NOT NULL,"
                " expires_at double precision NOT NULL,"
                " payload bytea)"
            ),
            render(
                "CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at)", index=sql.Identifier(f"{table}_expires_at")
            ),
        ]
        # Both the table and its index exist: nothing to create, and no lock to take.
        self.exists = b"SELECT to_regclass(%(table)s) IS NOT NULL AND to_regclass(%(index)s) IS NOT NULL"
        self.table_name = sql.Identifier(table).as_string(None)
        self.index_name = sql.Identifier(f"{table}_expires_at").as_string(None)
        # Serialises creation across processes: concurrent CREATE ... IF NOT EXISTS may fail with a unique violation.
        self.lock = b"SELECT pg_advisory_xact_lock(hashtext('idempo:create:' || %(table)s))"
        self.claim = render(
            "WITH now AS (SELECT {now} AS t),"
            " live AS ("
            "  SELECT r.key, r.state, r.fingerprint, r.token, r.created_at, r.lease_expires_at, r.expires_at, r.payload"
            "  FROM {t} AS r, now"
            "  WHERE r.key = %(key)s AND r.expires_at > now.t"
            f"  AND (r.state = {COMPLETED} OR r.lease_expires_at > now.t)),"
            " taken AS ("
            "  INSERT INTO {t} AS r ({cols})"
            f"  SELECT %(key)s, {IN_PROGRESS}, %(fingerprint)s, %(token)s, now.t, now.t + %(lease)s, now.t + %(ttl)s,"
            "  NULL FROM now WHERE NOT EXISTS (SELECT FROM live)"
            "  ON CONFLICT (key) DO UPDATE SET"
            f"  state = {IN_PROGRESS}, fingerprint = excluded.fingerprint, token = excluded.token,"
            "  created_at = excluded.created_at, lease_expires_at = excluded.lease_expires_at,"
            "  expires_at = excluded.expires_at, payload = NULL"
            "  WHERE r.expires_at <= excluded.created_at"
            f"  OR (r.state = {IN_PROGRESS} AND r.lease_expires_at <= excluded.created_at)"
            "  RETURNING r.key, r.state, r.fingerprint, r.token, r.created_at, r.lease_expires_at, r.expires_at,"
            "  r.payload)"
            " SELECT true, taken.* FROM taken"
            " UNION ALL SELECT false, live.* FROM live"
        )
        fenced = f"key = %(key)s AND token = %(token)s AND state = {IN_PROGRESS} AND expires_at > now.t"
        self.renew = render(
            "UPDATE {t} SET lease_expires_at = now.t + %(lease)s FROM (SELECT {now} AS t) AS now WHERE " + fenced
        )
        complete = (
            f"UPDATE {{t}} SET state = {COMPLETED}, token = '', payload = %(payload)s,"
            " lease_expires_at = now.t, expires_at = now.t + %(ttl)s"
            " FROM (SELECT {now} AS t) AS now WHERE " + fenced
        )
        self.complete = render(complete)
        # The same, run by the application inside its own transaction (idempo.transactions), in any driver's
        # parameter style: named parameters, and a cast rather than "::" after one (SQLAlchemy's text() would read
        # ":now::float8" as no parameter at all).
        self.complete_named = re.sub(
            r"%\((\w+)\)s",
            r":\1",
            render(complete, now=sql.SQL(_NOW_CAST)).decode(),
        )
        self.release = render("DELETE FROM {t} USING (SELECT {now} AS t) AS now WHERE " + fenced)
        self.get = render("SELECT {cols} FROM {t} WHERE key = %(key)s AND expires_at > {now}")
        self.delete = render("DELETE FROM {t} WHERE key = %(key)s")
        # In batches, so that a purge of millions of rows never runs into statement_timeout nor holds their
        # locks for long; SKIP LOCKED: a purge never waits for a claim (or another purge) that holds a row.
        self.purge = render(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE expires_at <= {now}"
            " LIMIT %(batch)s FOR UPDATE SKIP LOCKED))"
        )
        # Keyset pagination along the primary key's index: each page starts after the last key of the one
        # before, in the table's collation (ORDER BY and > agree on it, so no record is listed twice).
        like = f"key LIKE %(pattern)s ESCAPE '{LIKE_ESCAPE}' AND expires_at > {{now}}"
        self.scan_first = render("SELECT {cols} FROM {t} WHERE " + like + " ORDER BY key LIMIT %(size)s")
        self.scan_next = render(
            "SELECT {cols} FROM {t} WHERE key > %(after)s AND " + like + " ORDER BY key LIMIT %(size)s"
        )
        # Every statement in the positional style, by the named one.
        named = [*self.create, self.exists, self.lock, self.claim, self.renew, self.complete, self.release, self.get]
        named += [self.delete, self.purge, self.scan_first, self.scan_next]
        self.positional = {query: positional(query) for query in named}

    def in_order(self, query: bytes, names: tuple[str, ...]) -> str:
        """*query* in the positional style, whose parameters are *names* in this order (a caller that passes its
        arguments as a tuple says so here; a statement rewritten with its parameters in another order fails at once,
        rather than bind them wrongly)."""
        sql, order = self.positional[query]
        if order != names:
            msg = f"the statement's parameters are {order}, not {names}"
            raise RuntimeError(msg)
        return sql
