"""The public API: what ``idempo`` exports, its version, and that it imports with no extra installed."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import idempo

# Names a module picks up for its own annotations (``from __future__ import annotations``, ``typing.Any``):
# not part of the API, and not worth renaming to ``_Any`` in ``__init__``.
_HELPER_MODULES = {"__future__", "typing", "collections.abc"}


def _public_names() -> set[str]:
    return {
        name
        for name, value in vars(idempo).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", None) not in _HELPER_MODULES
    }


def test_all_is_sorted() -> None:
    assert idempo.__all__ == sorted(idempo.__all__)


def test_all_lists_exactly_the_public_names() -> None:
    assert set(idempo.__all__) == _public_names()
    assert len(idempo.__all__) == len(set(idempo.__all__))


@pytest.mark.parametrize("name", idempo.__all__)
def test_every_exported_name_says_it_is_idempos(name: str) -> None:
    """Each public name reads as ``idempo.<name>`` (help, reprs, the API reference), wherever it is defined."""
    value = getattr(idempo, name)
    members = value.__args__ if isinstance(value, types.UnionType) else (value,)  # Claim: Acquired | Existing
    for member in members:
        assert member.__module__ == "idempo", f"{name} says it lives in {member.__module__}"


def test_the_sans_io_toolkit_is_private() -> None:
    """The decision table, the codec and the key parser are how idempo is built, not its API."""
    for name in ("decide", "should_store", "encode_response", "decode_response", "parse_key", "Problem"):
        assert not hasattr(idempo, name), name


def test_version() -> None:
    assert idempo.__version__ == "0.1.0"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        getattr(idempo, "no_such_thing")  # noqa: B009 - the dynamic lookup is the point


def test_error_hierarchy() -> None:
    assert issubclass(idempo.ConfigurationError, ValueError)
    assert issubclass(idempo.MissingDependency, ImportError)
    assert issubclass(idempo.MissingDependency, idempo.ConfigurationError)
    for error in (idempo.ConfigurationError, idempo.StoreError, idempo.RequestError):
        assert issubclass(error, idempo.IdempoError)


_BLOCKED = ("redis", "psycopg", "psycopg_pool", "httpx", "starlette", "fastapi", "litestar", "uvicorn", "pytest")

_IMPORT_WITHOUT_EXTRAS = f"""
import sys
blocked = {_BLOCKED!r}
for name in blocked:
    sys.modules[name] = None  # "import name" now raises ImportError
import asyncio
import idempo
import idempo.testing
store = idempo.store_from_url("memory://")
assert isinstance(asyncio.run(store.claim("k", "fp", lease=1, ttl=1)), idempo.Acquired)
loaded = sorted(name for name in blocked if sys.modules.get(name) is not None)
assert not loaded, loaded
print("imported", idempo.__version__)
"""


def test_imports_without_extras_or_pytest() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_EXTRAS], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "imported 0.1.0\n")
