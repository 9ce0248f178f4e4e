"""The code's rooms: no import circle, no import upward, no module past 800 lines.

Read from the source (every ``import``, at the top of a module or inside a
function), so an import made late to dodge a circle still counts.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("sessions_app", "storage_backends")
MAX_LINES = 800

# Bottom to top: a module imports only from its own rank or a lower one. The
# longest prefix that names a module decides its rank.
RANKS = {
    "config": 0,
    "storage_backends": 1,
    # The vocabulary every room shares: key and id patterns, control characters.
    "sessions_app.naming": 2,
    "sessions_app.text": 2,
    # The request id: error bodies and log lines carry it.
    "sessions_app.corridor.request_id": 3,
    "sessions_app.observability": 4,
    "sessions_app.serving": 5,
    "sessions_app.corridor": 6,
    "sessions_app.schemas": 7,
    "sessions_app.openapi": 8,
    "sessions_app.api": 9,
    "sessions_app.ops": 10,
    # The console draws the export's lines as the CLI writes them.
    "sessions_app.console": 10,
    # The wiring (create_app, init_app) and the agent-sessions command.
    "sessions_app": 11,
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, pathlib.Path]:
    found = {"config": ROOT / "config.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = sources()


def imported(name: str, path: pathlib.Path) -> set[str]:
    """The modules of this code base that ``name`` imports, wherever in it the import is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # "from package import module" imports the module; a name, its module.
                child = f"{base}.{alias.name}"
                targets.add(child if child in MODULES else base)
    return {target for target in targets if target in MODULES and target != name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def rank(name: str) -> int:
    prefix = name
    while prefix not in RANKS:
        if "." not in prefix:
            raise LookupError(f"{name}: no rank in RANKS")
        prefix = prefix.rpartition(".")[0]
    return RANKS[prefix]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_imports_it_should() -> None:
    assert "sessions_app.corridor.errors" in GRAPH["sessions_app.corridor.http"]
    assert "sessions_app.corridor.request_id" in GRAPH["sessions_app.observability.logs"]
    # Inside a function: the tracing module is imported only when tracing is on.
    assert "sessions_app.observability.tracing" in GRAPH["sessions_app.observability.logs"]
    assert "storage_backends.sql.schema" in GRAPH["storage_backends.sql.events"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_upward(name: str) -> None:
    upward = sorted(target for target in GRAPH[name] if rank(target) > rank(name))
    assert upward == [], f"{name} (rank {rank(name)}) imports from above it"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_past_the_limit(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"
