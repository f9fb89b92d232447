"""Parsing store URLs, and keeping their passwords out of messages."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from .._core.errors import ConfigurationError

__all__ = ["StoreURL", "parse_store_url", "redact"]

# user:password@ in the authority; the password runs to the *last* @ before the path (as urlsplit reads it),
# so that a password with a raw "@" in it is hidden whole.
_PASSWORD = re.compile(r"(?<=://)([^:/@?#]*):[^/?#]*@")


def redact(url: str) -> str:
    """*url* with its password replaced by ``***``, for errors and logs."""
    return _PASSWORD.sub(r"\1:***@", url)


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A store URL, split once: ``scheme://netloc/path?options``.

    Attributes:
        raw: the URL as given (may hold a password: show ``redact(raw)``).
        scheme: lower-cased scheme, e.g. ``"sqlite"``.
        netloc: everything between ``//`` and the path (hosts, credentials).
        path: the path, as given.
        options: the query string as a mapping (the last value wins).
    """

    raw: str
    scheme: str
    netloc: str
    path: str
    options: Mapping[str, str]

    def option(self, name: str, default: str | None = None) -> str | None:
        """One query option, or *default*."""
        return self.options.get(name, default)

    def float_option(self, name: str, default: float) -> float:
        """A query option that must be a number."""
        value = self.options.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            msg = f"option {name}={value!r} of {redact(self.raw)!r} is not a number"
            raise ConfigurationError(msg) from None

    def int_option(self, name: str, default: int) -> int:
        """A query option that must be a whole number."""
        value = self.options.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            msg = f"option {name}={value!r} of {redact(self.raw)!r} is not a whole number"
            raise ConfigurationError(msg) from None

    def bool_option(self, name: str, default: bool) -> bool:
        """A query option that must be a yes or a no: ``true``/``false``, ``1``/``0``, ``yes``/``no``,
        ``on``/``off`` (any case)."""
        value = self.options.get(name)
        if value is None:
            return default
        answer = _BOOLEANS.get(value.lower())
        if answer is None:
            msg = f"option {name}={value!r} of {redact(self.raw)!r} is not true or false"
            raise ConfigurationError(msg)
        return answer


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_store_url(url: str) -> StoreURL:
    """Split *url*. Raises :class:`ConfigurationError` if it has no scheme."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        msg = f"{redact(url)!r} is not a valid store URL: {exc}"
        raise ConfigurationError(msg) from None
    if not parts.scheme or "://" not in url:
        msg = f"{redact(url)!r} is not a store URL; expected e.g. 'sqlite:///idempo.db' or 'memory://'"
        raise ConfigurationError(msg)
    return StoreURL(url, parts.scheme.lower(), parts.netloc, parts.path, dict(parse_qsl(parts.query)))
