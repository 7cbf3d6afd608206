"""The house rules, read from the source: imports run one way and form no circle.

Layers, from the top: the commands (``cli``, ``monitor``, ``doctor``, ``validate``,
``report``, ``contrib``, ``demo``, ``pytest``) -> ``guard`` (install: composes the concerns) ->
``concerns`` -> the core (``hooks``, ``lifecycle``, ``options``, ``stats``, ``recycle``,
``registry``, ``procfs``) -> the PostgreSQL driver layer (``postgres``) -> ``errors`` and
``version``, which every layer may import. Every import counts: at module level, inside
functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lifeguard"

LAYERS = {  # a module may import its own layer and any lower one
    "base": 0,
    "postgres": 1,
    "core": 2,
    "concerns": 3,
    "guard": 4,
    "commands": 5,
}
CORE = {"hooks", "lifecycle", "options", "stats", "recycle", "registry", "procfs"}
COMMANDS = {"cli", "monitor", "doctor", "validate", "report", "contrib", "demo", "pytest"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "guard"  # lifeguard/__init__.py re-exports install() and the public names
    top = parts[1]
    if top in ("errors", "version"):
        return "base"
    if top == "postgres":
        return "postgres"
    if top in CORE:
        return "core"
    if top == "concerns":
        return "concerns"
    if top == "guard":
        return "guard"
    if top in COMMANDS:
        return "commands"
    raise AssertionError(
        f"{module}: a module no layer claims; add it to tests/test_architecture.py"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every lifeguard module ``path`` imports, resolved to a module that exists."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
            found |= submodules or ({source} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_every_import_runs_down_the_layers() -> None:
    wrong = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if LAYERS[layer_of(target)] > LAYERS[layer_of(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_concern_imports_the_module_that_composes_it() -> None:
    graph = import_graph()
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if layer_of(module) != "commands"
        for target in targets
        if target in ("lifeguard", "lifeguard.guard") and module != "lifeguard"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle() -> None:
    graph = import_graph()
    # Tarjan's strongly connected components: a component of two or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_the_installed_package_holds_no_test_or_benchmark_harness(folder: str) -> None:
    harness = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if folder in p.read_text() and "import " + folder in p.read_text()
    ]
    assert not harness
