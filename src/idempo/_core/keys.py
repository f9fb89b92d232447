"""Parsing and validating the ``Idempotency-Key`` header value.

The IETF draft (draft-ietf-httpapi-idempotency-key-header) defines the field as a Structured-Field
*String*, i.e. ``Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"``. Most clients (Stripe's among
them) send the bare token instead. We accept both: a value wrapped in double quotes is unquoted as an
sf-string (``\\"`` and ``\\\\`` escapes), anything else is taken as it is. Either way the resulting key must be
1 to 255 visible ASCII characters (``!`` to ``~``): no spaces, no control characters, nothing non-ASCII.
"""

from __future__ import annotations

import re

from .errors import InvalidKeyError

__all__ = ["MAX_KEY_LENGTH", "parse_key"]

MAX_KEY_LENGTH = 255
_BARE = re.compile(rb"[\x21-\x7e]{1,255}")
# The inside of an RFC 8941 sf-string: printable ASCII (space allowed) minus DQUOTE and backslash, or an escape.
_SF_INNER = re.compile(rb'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*')
_SF_ESCAPE = re.compile(rb'\\(["\\])')


def parse_key(raw: bytes) -> str:
    """Return the key a raw header value carries.

    Args:
        raw: the header value as the ASGI server delivered it (surrounding whitespace is ignored).

    Returns:
        The key, unquoted if it was sent as a Structured-Field string.

    Raises:
        InvalidKeyError: the value is empty, longer than 255 characters, a broken sf-string, or contains
            anything but visible ASCII. Answer 400; the client must fix its key generator.
    """
    if raw[:1] != b'"' and _BARE.fullmatch(raw):  # the usual bare key, with nothing around it to strip
        return raw.decode("ascii")
    value = raw.strip(b" \t")
    if value[:1] == b'"':
        if len(value) < 2 or value[-1:] != b'"' or not _SF_INNER.fullmatch(value, 1, len(value) - 1):
            raise InvalidKeyError("the Idempotency-Key value opens a quoted string but is not a valid one")
        value = _SF_ESCAPE.sub(rb"\1", value[1:-1])
    if _BARE.fullmatch(value):
        return value.decode("ascii")
    if not value:
        raise InvalidKeyError("the Idempotency-Key value is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"the Idempotency-Key is {len(value)} characters long; at most {MAX_KEY_LENGTH} are allowed"
        )
    raise InvalidKeyError("the Idempotency-Key must be visible ASCII characters (! to ~) only")
