"""The layers contract (pyproject's [tool.importlinter], run by `make lint`) covers every
module: server/ and runner/ mix layers and are listed module by module, so a module nobody
put in a layer would be free to import anything. `lint-imports` itself checks the arrows."""

from __future__ import annotations

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
