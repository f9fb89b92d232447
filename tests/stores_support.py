"""Small helpers of the store tests: a fake clock, claim unpacking, and PostgreSQL tables of a test's own."""

from __future__ import annotations

import uuid

from idempo import Acquired, Claim, Existing, Record


class FakeClock:
    """A clock the test moves by hand (a store reads it instead of its own or its server's)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_of(claim: Claim) -> str:
    assert isinstance(claim, Acquired), claim
    return claim.token


def record_of(claim: Claim) -> Record:
    assert isinstance(claim, Existing), claim
    return claim.record


def new_table() -> str:
    """A table name no other test uses."""
    return f"idempo_test_{uuid.uuid4().hex[:16]}"


def drop_table(url: str, table: str) -> None:
    import psycopg  # only the PostgreSQL tests get here

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table)))
