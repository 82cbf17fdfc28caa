"""The layers contract (pyproject's [tool.importlinter], run by `make lint`) covers every
module: server/ and runner/ mix layers and are listed module by module, so a module nobody
put in a layer would be free to import anything. `lint-imports` itself checks the arrows.
And the runner reaches the database only through its store gateway: no SQL text or driver
object in runner/ outside it."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        config: dict[str, object] = tomllib.load(file)["tool"]["importlinter"]
    return config


def _layer_modules(config: dict[str, object]) -> list[str]:
    contracts = config["contracts"]
    assert isinstance(contracts, list)
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [name.strip() for layer in layers for name in layer.split(":")]


def _modules(package: str) -> set[str]:
    modules = set()
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.add(".".join(parts))
    return modules


def _listed(module: str, layers: list[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in layers)


def test_every_module_sits_in_a_layer() -> None:
    config = _config()
    layers = _layer_modules(config)
    packages = config["root_packages"]
    assert isinstance(packages, list)
    modules = set().union(*(_modules(package) for package in packages))
    unlisted = sorted(m for m in modules if not _listed(m, layers) and m not in packages)
    assert unlisted == [], f"put these modules in a layer of [tool.importlinter]: {unlisted}"
    assert "runner.supervisor" in modules  # the walk found the packages


def test_layers_name_existing_modules_once() -> None:
    layers = _layer_modules(_config())
    assert len(layers) == len(set(layers)), "a module is listed in two layers"
    for name in layers:
        path = ROOT / name.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), name


def test_xray_is_forbidden_every_runner_module_but_the_os_kit() -> None:
    """import-linter cannot forbid `runner` but `runner.oskit`: the xray contract lists the
    rest of runner/ module by module, and a module added to runner/ must join the list."""
    contracts = _config()["contracts"]
    assert isinstance(contracts, list)
    (forbidden,) = [
        c["forbidden_modules"] for c in contracts if c.get("source_modules") == ["xray"]
    ]
    children = {".".join(module.split(".")[:2]) for module in _modules("runner")} - {"runner"}
    assert "runner.oskit" in children  # the walk found the kit
    missing = sorted(children - {"runner.oskit"} - set(forbidden))
    assert missing == [], f"add these to the xray contract's forbidden_modules: {missing}"
    assert "runner.oskit" not in forbidden


# The store gateway (runner/store.py's Protocol, its two implementations, the statements and
# the errors) is the runner's only way to the database (STYLE.md, issue 15 item 1).
STORE_MODULES = {
    "store",
    "store_sqlite",
    "store_postgres",
    "statements",
    "statements_runners",
    "store_errors",
}
SQL_TEXT = re.compile(
    r"\bSELECT\b.*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bpg_\w+\(|\bjson_each\(|\bRETURNING\b|\bFOR\s+UPDATE\b",
    re.DOTALL,
)
# Database drivers, and SQLAlchemy beyond the async sessions and engine (the domain
# services' sessions, the engine the gateway is opened on).
DRIVER_IMPORT = re.compile(r"^(asyncpg|sqlite3|aiosqlite|psycopg2?|sqlalchemy(?!\.ext\.asyncio$))")


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def sql_and_drivers(source: str) -> list[str]:
    """The SQL texts (string constants, docstrings aside) and driver imports of a module."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and SQL_TEXT.search(node.value):
                found.append(f"line {node.lineno}: SQL text {node.value[:60]!r}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"line {node.lineno}: imports {n}" for n in names if DRIVER_IMPORT.match(n)]
    return found


def test_the_check_finds_sql_text_and_driver_objects() -> None:
    assert sql_and_drivers('X = "SELECT id FROM commands WHERE id = ?"\n')
    assert sql_and_drivers('X = ("UPDATE commands SET status = ?" " WHERE id = ?")\n')
    assert sql_and_drivers("from sqlalchemy import Connection\n")
    assert sql_and_drivers("import asyncpg\n")
    assert sql_and_drivers("from sqlalchemy.exc import IntegrityError\n")
    assert not sql_and_drivers('"""Takes a due check with one UPDATE ... SET."""\n')
    assert not sql_and_drivers("from sqlalchemy.ext.asyncio import AsyncSession\n")
    assert not sql_and_drivers('X = "select the proxy from the list"\n')


def test_no_sql_text_or_driver_object_in_the_runner_outside_its_store() -> None:
    checked = 0
    problems = []
    for path in sorted((ROOT / "runner").rglob("*.py")):
        if path.parent.name == "runner" and path.stem in STORE_MODULES:
            continue
        checked += 1
        name = path.relative_to(ROOT)
        problems += [f"{name}: {found}" for found in sql_and_drivers(path.read_text())]
    assert checked > 20  # the walk found the runner's modules
    assert problems == [], "SQL belongs in runner/statements.py, run by the store:\n" + "\n".join(
        problems
    )
