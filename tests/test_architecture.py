"""The import rules of the package, computed from the source (no module is imported).

Every ``import`` counts: at module level, inside functions (lazy) and under
``TYPE_CHECKING``, because a type-only import is still a dependency a reader must follow,
and a cycle of them is the first step to a real one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "evserver"
#: Modules that touch the network or the hub: nobody on the pure side may import them.
IO_MODULES = frozenset({"socket", "ssl", "select", "selectors", "eventlet", "greenlet"})
HUB_DOOR = "evserver._eventlet"
#: Sans-I/O modules: bytes, data and rules only (eventlet may be replaced; these stay).
PURE = frozenset({
    "evserver.protocol", "evserver.forward", "evserver.forward_handshake", "evserver.native",
    "evserver.forward_session",
    "evserver.states", "evserver.auth", "evserver.config", "evserver.app", "evserver.event",
    "evserver.errors",
})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(evserver modules, top-level outside modules) that ``name`` imports anywhere."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()

    def add(target: str) -> None:
        if target == "evserver" or target.startswith("evserver."):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target != name:
                inside.add(target)
        else:
            outside.add(target.partition(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:  # ``from . import protocol`` imports a module
                full = f"{stem}.{alias.name}"
                add(full if full in MODULES else stem)
    return inside, outside


GRAPH = {name: imports_of(name) for name in MODULES}


def closure(start: str, *, skip: frozenset[str] = frozenset()) -> set[str]:
    """Every evserver module ``start`` reaches through imports, not entering ``skip``."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in GRAPH[todo.pop()][0]:
            if target not in seen and target not in skip:
                seen.add(target)
                todo.append(target)
    return seen


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v][0]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source() -> None:
    # The rules below are only as good as the graph: check it sees each kind of import.
    assert "evserver.errors" in GRAPH["evserver.protocol"][0]  # from .errors import ...
    assert "msgpack" in GRAPH["evserver.protocol"][1]
    assert HUB_DOOR in GRAPH["evserver.dispatch"][0]
    assert "eventlet" in GRAPH[HUB_DOOR][1]


def test_no_import_cycles() -> None:
    assert cycles() == []


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_do_no_io(name: str) -> None:
    assert not GRAPH[name][1] & IO_MODULES, f"{name} imports {GRAPH[name][1] & IO_MODULES}"
    # Nor does anything they import: a protocol that reached the hub would not be sans-I/O.
    reached = {m for m in closure(name) if GRAPH[m][1] & IO_MODULES or m == HUB_DOOR}
    assert reached == set()


def test_what_dispatch_needs_does_no_io_but_through_the_hub_door() -> None:
    offenders = {
        name: GRAPH[name][1] & IO_MODULES
        for name in {"evserver.dispatch", *closure("evserver.dispatch", skip=frozenset({HUB_DOOR}))}
        if GRAPH[name][1] & IO_MODULES
    }
    assert offenders == {}


def test_only_the_hub_door_imports_eventlet_or_greenlet() -> None:
    offenders = {name for name, (_, outside) in GRAPH.items()
                 if name != HUB_DOOR and outside & {"eventlet", "greenlet"}}
    assert offenders == set()


def test_the_master_reaches_no_eventlet_by_structure() -> None:
    """Not even through a lazy import: the master runs no hub by construction, not by luck."""
    assert HUB_DOOR not in closure("evserver.supervisor")


def test_no_module_is_over_600_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > 600} == {}


def test_importing_the_master_loads_no_eventlet() -> None:
    """A fresh interpreter, since this one has imported eventlet long ago."""
    code = ("import sys, evserver.cli, evserver.supervisor; "
            "assert 'eventlet' not in sys.modules, sorted(m for m in sys.modules "
            "if m.startswith('eventlet'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=30,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
