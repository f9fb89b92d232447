"""The core stays sans-I/O: nothing in ``idempo._core`` imports the adapters, the stores, or any I/O library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import idempo._core

CORE = Path(idempo._core.__file__).parent
FORBIDDEN = ("asyncio", "socket", "sqlite3", "threading", "redis", "psycopg", "httpx", "starlette", "anyio")


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add("." * node.level + node.module)
    return modules


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io_and_no_adapter(path: Path) -> None:
    """Each core module imports only the standard library's pure parts and its sibling core modules."""
    for module in imported_modules(path):
        top = module.lstrip(".").partition(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {module}"
        if module.startswith(".."):
            pytest.fail(f"{path.name} imports {module}, outside the core")
        assert not module.startswith("idempo"), f"{path.name} imports {module}: use a relative import within _core"
