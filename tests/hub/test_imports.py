"""The modules of ``central_hub`` import one another without a cycle (type-only imports
included), and the hub's parts never import ``central_hub.service``."""

from __future__ import annotations

import ast
from pathlib import Path

import central_hub

PACKAGE = Path(central_hub.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The ``central_hub`` modules ``path`` imports, anywhere in it (functions and
    ``if TYPE_CHECKING:`` blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
            if node.module == "central_hub":
                names = [f"central_hub.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "central_hub" and len(parts) > 1:
                module = parts[1]
                if (PACKAGE / f"{module}.py").exists():
                    found.add(module)
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {
        path.stem: imports_of(path)
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem not in ("__init__", "__main__")
    }


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for other in sorted(edges.get(module, ())):
            if state.get(other) == 1:
                return [*stack[stack.index(other) :], other]
            if other not in state and (found := visit(other)) is not None:
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    assert cycle(graph()) is None


def test_the_checker_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_route_modules_do_not_import_api() -> None:
    edges = graph()
    assert [m for m in ("vault_api", "logs_api", "releases") if "api" in edges[m]] == []


def test_only_the_entry_points_import_the_service() -> None:
    """The hub's parts and routes never import ``central_hub.service`` (where ``Hub``
    is), not even for a type: only the command line and a replica, which runs one."""
    edges = graph()
    assert sorted(m for m, imported in edges.items() if "service" in imported) == [
        "cli",
        "replica",
    ]
