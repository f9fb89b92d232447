"""Who is asking: the rules of the default principal, for every face. Pure functions, no I/O.

Records are namespaced by a digest of the principal, so the principal decides who may receive a stored response:
two callers with the same principal share their keys. The default is, in order:

1. the **authenticated user** an auth middleware left in the request (Starlette's and Litestar's ``scope["user"]``,
   Django's ``request.user``): the same person gets the same namespace whatever credentials they present, so a
   retry sent with a refreshed access token is still a retry;
2. else the **Authorization header**, exactly one, with its scheme's case normalised (``bearer x`` is
   ``Bearer x``): two ``Authorization`` headers are refused, since the app and idempo could each believe another;
3. else **nobody**: one namespace shared by every anonymous caller (a warning is logged once; see
   :data:`ANONYMOUS_WARNING`).

Nothing here trusts an unverified claim (a JWT's ``sub`` read without checking its signature would let anyone
take another's namespace and receive their responses): only what an auth middleware verified, or the credentials
themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from .errors import RequestError

__all__ = ["ANONYMOUS_WARNING", "authorization_value", "principal_of", "user_principal"]

_IDENTITY_ATTRIBUTES = ("identity", "id", "pk", "username")

ANONYMOUS_WARNING = (
    "idempo: keyed requests arrive with no identity (no authenticated user in the request, no Authorization "
    "header), so all such callers share one namespace: one who learns another's key gets that caller's response. "
    "Run the middleware after your authentication middleware, or pass principal= (e.g. the session's user id)"
)


def principal_of(user: object, authorization: Sequence[bytes]) -> bytes:
    """The default principal of a request, from the *user* an auth middleware left in it (``None`` if none) and
    the values of its ``Authorization`` headers, by the rules of this module.

    Raises:
        RequestError: more than one ``Authorization`` header (400).
    """
    if user is not None:
        found = user_principal(user)
        if found is not None:
            return found
    if len(authorization) == 1:  # authorization_value's common case, without a call: this runs on every request
        return _normalised(authorization[0])
    return authorization_value(authorization)


def authorization_value(values: Sequence[bytes]) -> bytes:
    """The principal of a request's ``Authorization`` header *values*: ``b""`` for none; the one value with its
    scheme lower-cased and the whitespace around the credentials dropped.

    Raises:
        RequestError: more than one ``Authorization`` header (400).
    """
    if len(values) != 1:
        if values:
            msg = "send exactly one Authorization header"
            raise RequestError(msg)
        return b""
    return _normalised(values[0])


@functools.lru_cache(maxsize=4096)
def _normalised(value: bytes) -> bytes:
    """One ``Authorization`` value as a principal (cached: the same callers come back)."""
    scheme, _, credentials = value.strip().partition(b" ")
    if not scheme:
        return b""
    return b"authorization:" + scheme.lower() + b" " + credentials.strip()


def user_principal(user: object) -> bytes | None:
    """The principal of an authenticated *user* object, or ``None`` if it is absent, not authenticated, or has no
    identity to read.

    The identity is the first of ``identity`` (Starlette's ``BaseUser``), ``id``, ``pk`` (Django) and
    ``username`` that the object has (for a mapping, its ``"id"`` or ``"sub"`` item), qualified by the user's type.
    """
    if user is None or not getattr(user, "is_authenticated", True):
        return None
    identity: object = None
    if isinstance(user, Mapping):
        identity = user.get("id", user.get("sub"))
    else:
        for name in _IDENTITY_ATTRIBUTES:
            try:
                identity = getattr(user, name)
            except (AttributeError, NotImplementedError):  # Starlette's BaseUser.identity raises the latter
                continue
            if identity is not None and identity != "":
                break
    if identity is None or identity == "" or callable(identity):
        return None
    kind = type(user)
    return f"user:{kind.__module__}.{kind.__qualname__}:{identity}".encode("utf-8", "surrogatepass")
