"""What the stores' ``scan`` implementations share: the limit check, and literal prefixes in patterns."""

from __future__ import annotations

__all__ = ["check_limit", "glob_prefix", "like_prefix", "prefix_end"]


def check_limit(limit: int | None) -> None:
    """Raise ``ValueError`` for a negative scan *limit*."""
    if limit is not None and limit < 0:
        msg = f"limit must be None or at least 0, not {limit}"
        raise ValueError(msg)


def glob_prefix(prefix: str) -> str:
    """A Redis ``MATCH`` pattern for the keys starting with *prefix*, taken literally (``* ? [ ] \\`` escaped)."""
    escaped = "".join("\\" + char if char in "*?[]\\" else char for char in prefix)
    return escaped + "*"


def like_prefix(prefix: str) -> str:
    """A SQL ``LIKE ... ESCAPE '\\'`` pattern for the values starting with *prefix*, taken literally."""
    escaped = "".join("\\" + char if char in "%_\\" else char for char in prefix)
    return escaped + "%"


def prefix_end(prefix: str) -> str | None:
    """The least string greater than every string that starts with *prefix* (in code point order), so that
    ``prefix <= key < prefix_end(prefix)`` selects them by an index range; ``None`` if there is none (the
    prefix is empty or only U+10FFFF characters)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates cannot be encoded: the next character is U+E000
        following = 0xE000
    return stripped[:-1] + chr(following)
