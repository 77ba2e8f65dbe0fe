"""The house's floors, read from the source (DESIGN.md "The next layout"): no import circles anywhere,
`common` imports no stage, and nothing imports upward (cli → client → jobs, trainer → stages, infra →
common). Imports inside functions count: they are how a circle hides."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "infra", "dashboard")
STAGES = ("retriever", "generator", "inserter", "merger", "trainer")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from package import submodule` imports the
    submodule, not the package's `__init__`)."""
    paths = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py") if "migrations" not in path.parts]
    modules = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floor(module: str) -> int:
    """Higher floors may import lower ones, never the reverse."""
    parts = module.split(".")
    if parts[0] == "dashboard" or parts[:2] == ["services", "cli"]:
        return 5
    if module == "services.client":
        return 4
    if module.startswith("services.jobs") or module.startswith("services.trainer"):
        return 3
    if parts[0] == "services" and len(parts) > 1 and parts[1] in STAGES:
        return 2
    if parts[0] == "infra":
        return 2
    return 1  # services.common, services itself


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_common_imports_no_stage_and_nothing_imports_upward():
    graph = import_graph()
    upward = [
        (module, target) for module, targets in graph.items() for target in targets if floor(target) > floor(module)
    ]
    assert upward == []
    # the ones that matter most, spelled out
    assert not [
        (m, t)
        for m, ts in graph.items()
        if m.startswith("services.common")
        for t in ts
        if t.split(".")[1] in STAGES + ("jobs", "cli", "client")
    ]


def test_the_graph_sees_real_imports():
    """A check that cannot fail is worthless: the reader must find edges that exist."""
    graph = import_graph()
    assert "services.common.contracts" in graph["services.common.queues"]
    assert "services.jobs.commands" in graph["services.client"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


CLI_SHARED = {"services.cli.ui"}  # what every command module may import from the CLI
CLI_REGISTRY = {"services.cli", "services.cli.app", "services.cli.__main__"}  # gather the commands


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "services" / "cli").glob("*.py")))
def test_every_cli_module_imports(name):
    importlib.import_module(f"services.cli.{name}" if name != "__init__" else "services.cli")


def test_cli_command_modules_import_only_ui_and_the_library():
    graph = import_graph()
    cli = {module for module in graph if module.split(".")[:2] == ["services", "cli"]}
    commands = cli - CLI_SHARED - CLI_REGISTRY
    assert {f"services.cli.{name}" for name in ("cluster", "ingest", "jobs", "train", "demo")} <= commands
    for module in sorted(commands | CLI_SHARED):
        others = graph[module] & (cli - CLI_SHARED)
        assert not others, f"{module} imports {sorted(others)}: share through ui or the library"
    assert not graph["services.cli.ui"] & cli, "ui is the floor every command stands on"
