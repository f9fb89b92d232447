"""idempo's import rules. The contracts are in pyproject.toml (``[tool.importlinter]``) and ``make lint`` checks them
with import-linter: ``_core`` imports nothing of idempo outside ``_core`` and no I/O library; the stores import only
``_core``; the faces do not import each other except where one is built on another; ``idempo.client`` does not import
the stores.

Here: that each contract catches what it names (an import that breaks it, added to a copy of the package, makes
``lint-imports`` fail on that contract, while the copy as it is keeps every one), and the one rule the tool cannot
express: within ``_core``, imports are relative.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import idempo._core

PACKAGE = Path(idempo.__file__).parent
CORE = Path(idempo._core.__file__).parent
PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add("." * node.level + node.module)
    return modules


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_import_each_other_relatively(path: Path) -> None:
    """``from .records import Record``, never ``from idempo._core.records import Record``: the core reads as one
    self-contained package (what it may import at all is the contracts' business)."""
    absolute = sorted(module for module in imported_modules(path) if module.partition(".")[0] == "idempo")
    assert absolute == [], f"{path.name} imports {absolute}: use a relative import within _core"


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` with the project's contracts over the idempo package copied under *root*/src."""
    shutil.copy(PYPROJECT, root / "pyproject.toml")
    selected = [argument for contract in contracts for argument in ("--contract", contract)]
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *selected],
        cwd=root,
        env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the idempo package under *tmp_path*/src, to add imports to."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "idempo", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_package_as_it_is_keeps_every_contract(copy: Path) -> None:
    result = lint_imports(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


BREACHES = [
    # (the module that gets the import, the import, the contract it breaks)
    ("_core/keys.py", "import idempo.stores", "layers"),
    ("_core/keys.py", "from .. import observe", "layers"),
    ("_core/keys.py", "import idempo", "layers"),  # the package imports every face
    ("_core/keys.py", "import asyncio", "core-io"),
    ("_core/keys.py", "import time", "core-io"),
    ("stores/_url.py", "from .. import decorators", "layers"),
    ("stores/_url.py", "from ..client import is_outcome_unknown", "layers"),
    ("client.py", "from .stores import require", "client"),
    ("decorators.py", "from .asgi import IdempotencyMiddleware", "faces"),
    ("metrics.py", "from . import asgi", "faces"),
    ("observe.py", "from . import metrics", "faces"),
    ("proxy/_config.py", "from .. import decorators", "faces"),
    ("_asgi/types.py", "from .. import decorators", "faces"),
    ("proxy/_app.py", "from .._serialize import JSONSerializer", "faces"),  # another face's private part
    ("testing/__init__.py", "from .. import client", "faces"),
]


@pytest.mark.parametrize(("module", "statement", "contract"), BREACHES, ids=lambda value: str(value))
def test_an_import_that_breaks_a_contract_fails_it(copy: Path, module: str, statement: str, contract: str) -> None:
    path = copy / "src" / "idempo" / module
    path.write_text(f"{path.read_text('utf-8')}\n{statement}  # noqa\n", "utf-8")
    result = lint_imports(copy, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout


def test_a_new_module_must_be_placed_in_the_layers(copy: Path) -> None:
    (copy / "src" / "idempo" / "newface.py").write_text('"""A new face nobody placed yet."""\n', "utf-8")
    result = lint_imports(copy, "layers")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "idempo.newface" in result.stdout
