"""The ``ats_wsi`` package has no import cycle.

The graph is built from the source with :mod:`ast`, without importing anything. The cycle that
can break an import counts only imports that run when a module is imported: those at module
level (including inside ``if``, ``try`` and class bodies), not those inside functions (the
standard way to defer a heavy dependency, since they run on use, when every module is loaded).
A second check counts the imports inside functions too, so that no two modules need each
other at all ("no import circle anywhere in the package", issue 21). Imports under
``if TYPE_CHECKING:`` never run and never count.

Package semantics:

* ``import a.b.c`` and ``from a.b.c import x`` depend on ``a.b.c`` and on the packages ``a``
  and ``a.b`` (Python runs their ``__init__`` first) -- except the importer's own ancestor
  packages, which Python has already started before the importer runs;
* ``from a.b import x`` depends on ``a.b.x`` when ``x`` is a submodule, otherwise on
  ``a.b``'s ``__init__`` (even from inside ``a.b``: the name must already be defined there);
* relative imports are resolved against the importer's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ats_wsi

ROOT = Path(ats_wsi.__file__).resolve().parent
PACKAGE = "ats_wsi"


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run on import (``deferred``: those in functions too), never
    those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and not deferred:
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]))
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(node: ast.Import | ast.ImportFrom, own_package: str, modules: dict[str, Path]):
    """(module, whether a name its ``__init__`` defines is needed) for each imported name."""
    if isinstance(node, ast.Import):
        return [(alias.name, False) for alias in node.names]
    if node.level:
        parts = own_package.split(".")
        if node.level > 1:
            parts = parts[: -(node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [
        (f"{base}.{a.name}", False) if f"{base}.{a.name}" in modules else (base, True)
        for a in node.names
    ]


def _dependencies(
    name: str, path: Path, modules: dict[str, Path], deferred: bool
) -> set[str]:
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]
    # Python starts these before the importer runs; only a name they define is a dependency.
    running = set(_ancestors(name)) | ({name} if is_package else set())
    deps: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in _import_nodes(tree, deferred):
        for target, init_needed in _targets(node, own_package, modules):
            if target.split(".")[0] != PACKAGE:
                continue
            for mod in [*_ancestors(target), target]:
                if mod not in modules or mod == name:
                    continue
                if mod in running and not (init_needed and mod == target):
                    continue
                deps.add(mod)
    return deps


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring); ``deferred``
    counts the imports inside functions as well."""
    modules = _modules()
    return {name: _dependencies(name, path, modules, deferred) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := dfs(dep)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)) is not None:
            return cycle
    return None


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "ats_wsi.io" in graph and "ats_wsi.io.errors" in graph["ats_wsi.io.registry"]
    # A sibling import from inside a package does not depend on the package's own __init__.
    assert "ats_wsi.io" not in graph["ats_wsi.io.registry"]


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_counting_deferred_imports() -> None:
    # Stricter than Python needs: a deferred import cannot fail, but a circle through one
    # still ties two modules together (the readers <-> images circle of issue 21 was one).
    cycle = find_cycle(import_graph(deferred=True))
    assert cycle is None, "import cycle (through an import inside a function): " + " -> ".join(
        cycle or []
    )
