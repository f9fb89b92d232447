"""Who is asking, read from an ASGI scope by the rules of :mod:`idempo._core.principal`. Re-exported by
:mod:`idempo.asgi`."""

from __future__ import annotations

from .._core.principal import authorization_value, principal_of
from .types import Scope

__all__ = ["authorization_principal", "default_principal"]


def authorization_principal(scope: Scope) -> bytes:
    """The principal of the request's ``Authorization`` header: its one value, scheme case normalised (``b""``
    when there is none). Two ``Authorization`` headers are refused with a 400, since the app may believe the one
    and idempo the other."""
    return authorization_value([value for name, value in scope["headers"] if name == b"authorization"])


def default_principal(scope: Scope) -> bytes:
    """The default principal: the authenticated user an auth middleware put in ``scope["user"]`` (Starlette's
    ``AuthenticationMiddleware``, Litestar's auth), else the ``Authorization`` header
    (:func:`authorization_principal`), else ``b""``, which every anonymous caller shares (the middleware warns
    once).

    The user comes first so that a caller keeps their namespace when their access token is refreshed between two
    retries; it is only there if the auth middleware ran before this one (added after it with ``add_middleware``,
    or listed before it in ``middleware=[...]``).
    """
    return principal_of(scope.get("user"), [value for name, value in scope["headers"] if name == b"authorization"])
