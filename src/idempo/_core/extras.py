"""Optional dependencies (the *extras*): import one, or say which extra installs it.

Here rather than in ``idempo.stores`` because more than the stores need it (the httpx transports of
``idempo.client``, the proxy), and ``idempo.client`` must not import the stores (the import contracts in
``pyproject.toml``). Importing a module is not I/O the core has to avoid: nothing here reads a socket or a file of
the caller's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency

__all__ = ["require"]


def require(module: str, *, extra: str) -> ModuleType:
    """Import *module*, or raise :class:`~idempo.MissingDependency` naming the extra to install.

    Only *module*'s own absence is reported so: a dependency of it that is missing, or any other error while it
    imports, propagates as it is.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.partition(".")[0]:
            raise
        msg = f"{module!r} is not installed; run: pip install 'idempo[{extra}]'"
        raise MissingDependency(msg) from exc
