"""The CLI's layout holds: every `services.cli` module imports, a command module imports only `ui`
and the library (never another command module), and `services/common` imports no stage."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CLI = REPO_ROOT / "services" / "cli"
SHARED = {"ui"}  # what every command module may import from services.cli
REGISTRY = {"__init__", "app", "__main__"}  # the modules that gather the commands
STAGES = ("retriever", "generator", "inserter", "merger", "trainer", "jobs")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, top level or inside a function, as absolute dotted names."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .ui import fail` in services/cli/jobs.py is services.cli.ui
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from services.cli import jobs`
    return found


def cli_modules() -> list[str]:
    return sorted(path.stem for path in CLI.glob("*.py"))


@pytest.mark.unit
@pytest.mark.parametrize("name", cli_modules())
def test_every_cli_module_imports(name):
    importlib.import_module(f"services.cli.{name}" if name != "__init__" else "services.cli")


@pytest.mark.unit
def test_command_modules_import_only_ui_and_the_library():
    commands = set(cli_modules()) - SHARED - REGISTRY
    assert {"cluster", "ingest", "jobs", "train", "demo"} <= commands
    for name in sorted(commands | SHARED):
        imported = {m.removeprefix("services.cli.") for m in imported_modules(CLI / f"{name}.py")}
        others = imported & (set(cli_modules()) - SHARED - {name})
        assert not others, f"services/cli/{name}.py imports {sorted(others)}: share through ui or the library"
    ui = {m for m in imported_modules(CLI / "ui.py") if m.startswith("services.cli")}
    assert not ui, f"ui imports {sorted(ui)}: it is the floor every command stands on"


@pytest.mark.unit
def test_nothing_below_the_cli_imports_it():
    for path in sorted((REPO_ROOT / "services").rglob("*.py")):
        if CLI in path.parents:
            continue
        upward = {m for m in imported_modules(path) if m == "services.cli" or m.startswith("services.cli.")}
        assert not upward, f"{path.relative_to(REPO_ROOT)} imports {sorted(upward)}"


@pytest.mark.unit
def test_common_imports_no_stage():
    above = {f"services.{name}" for name in (*STAGES, "client", "cli")}
    for path in sorted((REPO_ROOT / "services" / "common").rglob("*.py")):
        upward = {m for m in imported_modules(path) if ".".join(m.split(".")[:2]) in above}
        assert not upward, f"{path.relative_to(REPO_ROOT)} imports {sorted(upward)}"
