"""Check the sdist and the wheel that ``make dist`` built, before anyone installs or uploads them.

    python scripts/check_dist.py [DIST_DIR]      (default: dist/)

DIST_DIR must hold exactly one ``idempo-<version>.tar.gz`` and one ``idempo-<version>-py3-none-any.whl`` of the
version in pyproject.toml. What is checked:

- the wheel's ``idempo/`` holds every file of ``src/idempo`` (the modules, ``py.typed``, ``static/idempo.js``, the
  Redis store's ``stores/lua/*.lua``, the demo's page) and nothing else, and nothing outside ``idempo/`` but its
  ``.dist-info``;
- its metadata: the name, the version, ``Requires-Python``, every extra of pyproject.toml, no dependency outside
  an extra (the core is standard library only), and the ``idempo`` command's entry point;
- the sdist holds ``src/idempo`` whole as well, with pyproject.toml, README.md and the tests; its ``PKG-INFO`` has
  the same name and version.

Exits 1 with one line per problem, 0 with a summary. Standard library only, so that it runs with any Python.
"""

from __future__ import annotations

import email.parser
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "idempo"
# Named outright, on top of "all of src/idempo", so that the message says what matters if they go missing.
REQUIRED = ("idempo/py.typed", "idempo/static/idempo.js", "idempo/stores/lua/claim.lua")


def source_files() -> set[str]:
    """The files of the package in the source tree, as ``idempo/...`` paths (no bytecode)."""
    return {
        "idempo/" + path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def project() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as file:
        table: dict[str, object] = tomllib.load(file)["project"]
    return table


def metadata(text: str) -> Message:
    return email.parser.Parser().parsestr(text)


def check_wheel(path: Path, expected: set[str], name: str, version: str, extras: list[str]) -> list[str]:
    problems = []
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        info = f"{name}-{version}.dist-info"
        shipped = {n for n in names if n.startswith("idempo/")}
        problems += [f"{path.name}: {n} is missing" for n in REQUIRED if n not in shipped]
        problems += [f"{path.name}: {n} is missing" for n in sorted(expected - shipped) if n not in REQUIRED]
        problems += [f"{path.name}: {n} is not in src/idempo" for n in sorted(shipped - expected)]
        stray = sorted(n for n in names - shipped if not n.startswith(info + "/"))
        problems += [f"{path.name}: {n} is outside the package" for n in stray]
        try:
            meta = metadata(wheel.read(f"{info}/METADATA").decode())
            entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        except KeyError as exc:
            return [*problems, f"{path.name}: {exc.args[0]}"]
    if (meta["Name"], meta["Version"]) != (name, version):
        problems.append(f"{path.name}: METADATA says {meta['Name']} {meta['Version']}, not {name} {version}")
    if not meta["Requires-Python"]:
        problems.append(f"{path.name}: METADATA has no Requires-Python")
    provided = set(meta.get_all("Provides-Extra") or [])
    problems += [f"{path.name}: the extra {extra!r} is not provided" for extra in extras if extra not in provided]
    unconditional = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    problems += [f"{path.name}: depends on {r!r} outside any extra" for r in unconditional]
    if "idempo = idempo._cli:main" not in entry_points:
        problems.append(f"{path.name}: no 'idempo' command in entry_points.txt")
    return problems


def check_sdist(path: Path, expected: set[str], name: str, version: str) -> list[str]:
    root = f"{name}-{version}/"
    with tarfile.open(path) as sdist:
        names = {member.name.removeprefix(root) for member in sdist.getmembers() if member.isfile()}
        pkg_info = sdist.extractfile(root + "PKG-INFO")
        meta = metadata(pkg_info.read().decode()) if pkg_info is not None else Message()
    shipped = {n.removeprefix("src/") for n in names if n.startswith("src/idempo/")}
    problems = [f"{path.name}: src/{n} is missing" for n in REQUIRED if n not in shipped]
    problems += [f"{path.name}: src/{n} is missing" for n in sorted(expected - shipped) if n not in REQUIRED]
    problems += [f"{path.name}: src/{n} is not in src/idempo" for n in sorted(shipped - expected)]
    for needed in ("pyproject.toml", "README.md", "tests/conftest.py"):
        if needed not in names:
            problems.append(f"{path.name}: {needed} is missing")
    if (meta["Name"], meta["Version"]) != (name, version):
        problems.append(f"{path.name}: PKG-INFO says {meta['Name']} {meta['Version']}, not {name} {version}")
    return problems


def main(argv: list[str]) -> int:
    dist = Path(argv[0]) if argv else REPO / "dist"
    about = project()
    name, version = str(about["name"]), str(about["version"])
    optional = about.get("optional-dependencies")
    extras = list(optional) if isinstance(optional, dict) else []
    wheels = sorted(dist.glob(f"{name}-{version}-*.whl"))
    sdists = sorted(dist.glob(f"{name}-{version}.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        found = ", ".join(p.name for p in sorted(dist.iterdir())) if dist.is_dir() else "no such directory"
        print(f"check_dist: want one wheel and one sdist of {name} {version} in {dist} ({found})", file=sys.stderr)
        return 1
    expected = source_files()
    problems = check_wheel(wheels[0], expected, name, version, extras)
    problems += check_sdist(sdists[0], expected, name, version)
    for problem in problems:
        print(f"check_dist: {problem}", file=sys.stderr)
    if problems:
        return 1
    lua = sorted(n.rpartition("/")[2] for n in expected if n.endswith(".lua"))
    print(
        f"check_dist: {wheels[0].name} and {sdists[0].name}: {len(expected)} files of src/idempo each "
        f"(idempo.js, {', '.join(lua)}, py.typed), extras {', '.join(extras)}, the 'idempo' command"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
