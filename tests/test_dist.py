"""What ``make dist`` builds: the wheel and the sdist hold the whole package (``idempo.js``, the Redis store's Lua
scripts, ``py.typed``), as ``scripts/check_dist.py`` checks; the check fails when one is missing; and the wheel,
installed alone into a fresh virtual environment, imports and works from its own files there.

The suite builds with ``python -m build --no-isolation``, with the ``build`` and ``hatchling`` of the dev extra: no
package index and no download, so that it runs offline, in a few seconds. ``make dist`` builds isolated (a temporary
environment with the hatchling pyproject.toml's ``[build-system]`` asks for, from the index), as a release should.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support.environment import skip_or_fail

REPO = Path(__file__).resolve().parent.parent
LUA = ["claim.lua", "complete.lua", "release.lua", "renew.lua"]


def run(*args: str | Path, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the sdist and the wheel built from this checkout (the wheel from the sdist, as pip would)."""
    for module in ("build", "hatchling"):
        if importlib.util.find_spec(module) is None:
            skip_or_fail(f"the {module} package (dev extra) is not installed: run 'make install'")
    out = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO)
    assert built.returncode == 0, built.stdout + built.stderr
    return out


def only(directory: Path, pattern: str) -> Path:
    [path] = directory.glob(pattern)
    return path


def test_the_wheel_and_the_sdist_hold_idempo_js_and_the_lua_scripts(dist: Path) -> None:
    wheel = zipfile.ZipFile(only(dist, "idempo-*.whl"))
    in_wheel = set(wheel.namelist())
    assert {"idempo/static/idempo.js", "idempo/py.typed", *(f"idempo/stores/lua/{n}" for n in LUA)} <= in_wheel
    assert wheel.read("idempo/static/idempo.js") == (REPO / "src/idempo/static/idempo.js").read_bytes()
    assert not any(name.startswith("tests/") for name in in_wheel)

    with tarfile.open(only(dist, "idempo-*.tar.gz")) as sdist:
        root = sdist.getnames()[0].split("/")[0]
        in_sdist = {name.removeprefix(root + "/") for name in sdist.getnames()}
        lua = sdist.extractfile(f"{root}/src/idempo/stores/lua/claim.lua")
        assert lua is not None
        assert lua.read() == (REPO / "src/idempo/stores/lua/claim.lua").read_bytes()
    assert {"src/idempo/static/idempo.js", *(f"src/idempo/stores/lua/{n}" for n in LUA)} <= in_sdist
    assert {"pyproject.toml", "README.md", "tests/conftest.py"} <= in_sdist


def test_check_dist_passes_on_them(dist: Path) -> None:
    checked = run(sys.executable, REPO / "scripts/check_dist.py", dist)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("check_dist: idempo-0.1.0-py3-none-any.whl and idempo-0.1.0.tar.gz: ")
    assert "(idempo.js, claim.lua, complete.lua, release.lua, renew.lua, py.typed)" in checked.stdout


def test_check_dist_names_what_is_missing(dist: Path, tmp_path: Path) -> None:
    """A wheel without idempo.js and a Lua script, and an sdist without the Lua scripts, fail the check: one line
    each, naming the file."""
    wheel, sdist = only(dist, "*.whl"), only(dist, "*.tar.gz")
    with zipfile.ZipFile(wheel) as whole, zipfile.ZipFile(tmp_path / wheel.name, "w") as cut:
        for item in whole.infolist():
            if item.filename not in ("idempo/static/idempo.js", "idempo/stores/lua/renew.lua"):
                cut.writestr(item, whole.read(item))
    with tarfile.open(sdist) as whole, tarfile.open(tmp_path / sdist.name, "w:gz") as cut:
        for member in whole.getmembers():
            if "/src/idempo/stores/lua/" not in member.name:
                content = whole.extractfile(member) if member.isfile() else None
                cut.addfile(member, io.BytesIO(content.read()) if content is not None else None)

    checked = run(sys.executable, REPO / "scripts/check_dist.py", tmp_path)
    assert checked.returncode == 1
    problems = checked.stderr.splitlines()
    assert f"check_dist: {wheel.name}: idempo/static/idempo.js is missing" in problems
    assert f"check_dist: {wheel.name}: idempo/stores/lua/renew.lua is missing" in problems
    assert [p for p in problems if sdist.name in p] == [
        f"check_dist: {sdist.name}: src/idempo/stores/lua/{name} is missing" for name in LUA
    ]
    assert checked.stdout == ""


def test_the_wheel_installs_alone_into_a_fresh_venv_and_works_from_there(dist: Path, tmp_path: Path) -> None:
    """No dependency installed (the core is standard library only): idempo imports from the venv's site-packages,
    knows its version, reads idempo.js and the Lua scripts as package resources, keeps a record in SQLite; its
    ``idempo`` command is there and asks for the cli extra."""
    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
        only(dist, "*.whl"),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    code = """if True:
        import importlib.resources, importlib.util, json, sys
        import idempo, idempo.static
        from idempo.stores.sqlite import SyncSQLiteStore
        store = SyncSQLiteStore(":memory:")
        claimed = type(store.claim("k", "f" * 64, lease=5, ttl=60)).__name__
        print(json.dumps({
            "file": idempo.__file__,
            "version": idempo.__version__,
            "js": idempo.static.script_source()[:200],
            "lua": sorted(p.name for p in (importlib.resources.files("idempo.stores") / "lua").iterdir()),
            "claimed": claimed,
            "httpx": importlib.util.find_spec("httpx") is not None,
        }))
    """
    result = run(python, "-I", "-c", code, cwd=tmp_path)  # -I: no PYTHONPATH, no user site, not the checkout
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert Path(seen["file"]).is_relative_to(venv / "lib")
    assert seen["version"] == "0.1.0"
    assert seen["js"] == (REPO / "src/idempo/static/idempo.js").read_text("utf-8")[:200]
    assert seen["lua"] == LUA
    assert seen["claimed"] == "Acquired"
    assert seen["httpx"] is False  # nothing but idempo was installed

    command = run(venv / "bin" / "idempo", "--help", cwd=tmp_path)
    assert command.returncode == 2
    assert "the command line needs the 'cli' extra; install it with: pip install 'idempo[cli]'" in command.stderr
