"""The shape of the code: no import cycles among the project's modules (imports inside functions
count too), no module over 600 lines (benchmark and test scripts included), no folder of the core over
12 modules."""

from __future__ import annotations

import ast
import os

from tests.conftest import REPO_ROOT

PACKAGES = ("delf_retrieval", "pipeline", "transforms")
MAX_LINES = 600
MAX_MODULES = 12


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(REPO_ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def imports_of(path: str, known: dict) -> set[str]:
    """The project modules a file imports, anywhere in it (a module, or the module a name comes from)."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            for alias in node.names:  # a submodule imported from its package is an edge to the submodule
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    # A package's __init__ is not an edge of its submodules' imports: importing a.b runs a first,
    # which is Python's order, not a dependency of ours.
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_600_lines():
    scripts = {os.path.join(folder, name): os.path.join(REPO_ROOT, folder, name) for folder in ("benchmarks", "tests")
               for name in os.listdir(os.path.join(REPO_ROOT, folder)) if name.endswith(".py")}
    long = {name: n for name, path in (modules() | scripts).items() if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert long == {}


def test_no_folder_of_the_core_holds_more_than_12_modules():
    crowded = {}
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "delf_retrieval")):
        count = sum(1 for n in names if n.endswith(".py") and n != "__init__.py")
        if count > MAX_MODULES:
            crowded[os.path.relpath(folder, REPO_ROOT)] = count
    assert crowded == {}
