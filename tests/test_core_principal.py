"""The default principal's rules (``idempo._core.principal``), as a table: who is asking, for every face."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.authentication import SimpleUser, UnauthenticatedUser

from idempo import RequestError
from idempo._core.principal import authorization_value, principal_of, user_principal


class _DjangoLikeUser:
    is_authenticated = True

    def __init__(self, pk: int) -> None:
        self.pk = pk


class _NoIdentity:
    is_authenticated = True


@pytest.mark.parametrize(
    ("user", "authorization", "expected"),
    [
        pytest.param(None, [], b"", id="nobody: the shared anonymous namespace"),
        pytest.param(None, [b"Bearer abc"], b"authorization:bearer abc", id="the header"),
        pytest.param(None, [b"bearer abc"], b"authorization:bearer abc", id="scheme case normalised"),
        pytest.param(None, [b"  BEARER   abc  "], b"authorization:bearer abc", id="spaces around dropped"),
        pytest.param(None, [b"Bearer ABC"], b"authorization:bearer ABC", id="credentials keep their case"),
        pytest.param(None, [b"Basic dXNlcjpwdw=="], b"authorization:basic dXNlcjpwdw==", id="basic"),
        pytest.param(None, [b""], b"", id="an empty header is no header"),
        pytest.param(SimpleUser("alice"), [b"Bearer t1"], None, id="the user, not the token"),
        pytest.param(UnauthenticatedUser(), [b"Bearer t1"], b"authorization:bearer t1", id="unauthenticated user"),
        pytest.param(_NoIdentity(), [b"Bearer t1"], b"authorization:bearer t1", id="a user without identity"),
        pytest.param({"id": 7}, [], None, id="a mapping user"),
    ],
)
def test_principal_of(user: Any, authorization: list[bytes], expected: bytes | None) -> None:
    found = principal_of(user, authorization)
    assert found == (expected if expected is not None else user_principal(user))
    assert found is not None


def test_a_refreshed_token_keeps_the_users_principal() -> None:
    assert principal_of(SimpleUser("alice"), [b"Bearer t1"]) == principal_of(SimpleUser("alice"), [b"Bearer t2"])
    assert principal_of(SimpleUser("alice"), []) != principal_of(SimpleUser("bob"), [])


def test_users_of_different_types_never_share_a_principal() -> None:
    assert user_principal(_DjangoLikeUser(1)) != user_principal({"id": 1})
    assert user_principal(_DjangoLikeUser(1)) == user_principal(_DjangoLikeUser(1))


def test_a_user_principal_never_equals_a_header_principal() -> None:
    user = user_principal(SimpleUser("authorization:bearer x"))
    assert user is not None
    assert user != authorization_value([b"Bearer x"])


def test_two_authorization_headers_are_refused() -> None:
    with pytest.raises(RequestError, match="exactly one Authorization"):
        authorization_value([b"Bearer a", b"Bearer b"])
    with pytest.raises(RequestError):
        principal_of(None, [b"Bearer a", b"Bearer a"])
