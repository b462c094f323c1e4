"""The layer order of docs/architecture.md, enforced: no import runs upward and no two modules import each other.

Every ``.py`` file of the four source folders is parsed with :mod:`ast` (module-level and function-level
imports alike, as Python would run them); each module is mapped to its part, and each import of another
equiforce module is checked against the table of docs/architecture.md. Cycles are the strongly connected
components of the module graph (Tarjan), with imports of a package's ``__init__`` left out as the shared
``import_cycles`` tool does (a package re-exports its modules, so ``from equiforce.data import X`` names the
package, not a module that imports back).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "equiforce.potentials": ROOT / "potentials",
    "equiforce.md": ROOT / "md",
    "equiforce.data": ROOT / "data",
    "equiforce": ROOT / "src" / "equiforce",
}

#: part -> layer, as in docs/architecture.md (a part may import its own layer's modules only within itself)
LAYERS: dict[str, int] = {
    "foundations": 0,
    "data": 1,
    "potentials": 2,
    "md": 3,
    "uncertainty": 4,
    "training": 5,
    "benchmark": 6,
    "vibrations": 6,
    "interop": 6,
    "lammps": 6,
    "learning": 6,
    "model_info": 6,
    "entry points": 7,
}
FOUNDATIONS = {"equiforce", "equiforce.atomic", "equiforce.faults", "equiforce.figures"}
ENTRY_POINTS = {"equiforce.cli", "equiforce.config_reference", "equiforce.__main__"}


def part_of(module: str) -> str:
    if module in FOUNDATIONS:
        return "foundations"
    if module in ENTRY_POINTS:
        return "entry points"
    name = module.split(".")[1]
    if name not in LAYERS:
        raise AssertionError(f"{module} belongs to no part of docs/architecture.md: add it to the table there and here")
    return name


def discover() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "equiforce" and parts and parts[0] in ("potentials", "md", "data"):
                continue
            modules[".".join([package, *parts])] = path
    return modules


MODULES = discover()


def imports_of(module: str) -> set[str]:
    """The equiforce modules (or packages) that ``module`` imports anywhere in its file."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        mine = part_of(module)
        for target in sorted(targets):
            theirs = part_of(target)
            if theirs == mine:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(
                    f"{module} ({mine}, layer {LAYERS[mine]}) imports {target} ({theirs}, layer {LAYERS[theirs]})"
                )
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def module_graph() -> dict[str, set[str]]:
    """The import graph without edges into packages' ``__init__`` files (re-exports)."""
    return {m: {t for t in targets if MODULES[t].name != "__init__.py"} for m, targets in GRAPH.items()}


def test_every_module_belongs_to_a_part_of_the_documented_table():
    documented = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for module in MODULES:
        part = part_of(module)
        if part not in ("foundations", "entry points"):
            assert re.search(rf"\b{part}\b", documented), f"part {part!r} of {module} is missing from the page"


def test_no_import_runs_upward():
    wrong = upward_imports(GRAPH)
    assert not wrong, "imports that run up the layers of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_see_an_upward_import_and_a_cycle():
    """The two checks above can fail: an invented upward import and an invented cycle are found."""
    graph = {m: set(t) for m, t in module_graph().items()}
    graph["equiforce.data.structures"].add("equiforce.md.run")
    graph["equiforce.md.run"].add("equiforce.data.structures")
    assert any("equiforce.data.structures" in c and "equiforce.md.run" in c for c in cycles(graph))
    upward = {m: set(t) for m, t in GRAPH.items()}
    upward["equiforce.data.structures"].add("equiforce.training.config")
    assert any(w.startswith("equiforce.data.structures (data") for w in upward_imports(upward))


@pytest.mark.parametrize("module", ["equiforce.data.structures", "equiforce.md.run", "equiforce.training.trainer"])
def test_imports_are_found(module):
    """Sanity: the parser finds the imports that these modules certainly have."""
    assert GRAPH[module], f"no equiforce import found in {module}"
