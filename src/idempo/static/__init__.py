"""Files idempo ships for browsers: ``idempo.js``, the client half of the ``Idempotency-Key`` pattern.

``idempo.js`` is a dependency-free ES module (no build step) inside the installed package. Serve it from your own
application, for example with Starlette::

    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    import idempo.static

    routes = [Mount("/static/idempo", StaticFiles(directory=idempo.static.directory()))]

and import it in a page with ``import { idempotentFetch, idempotentSubmit } from "/static/idempo/idempo.js"``.
``docs/browser.md`` describes its API.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["SCRIPT_NAME", "directory", "script_path", "script_source"]

SCRIPT_NAME = "idempo.js"
"""The file name of the ES module, within :func:`directory`."""


def directory() -> Path:
    """The directory of the installed package that holds ``idempo.js``, to serve as static files."""
    return Path(str(files(__name__)))


def script_path() -> Path:
    """The path of ``idempo.js`` in the installed package."""
    return directory() / SCRIPT_NAME


def script_source() -> str:
    """The text of ``idempo.js`` (UTF-8), to serve or embed without touching the file system yourself."""
    return (files(__name__) / SCRIPT_NAME).read_text(encoding="utf-8")
