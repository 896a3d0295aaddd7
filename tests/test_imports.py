"""No import cycle in pytest_gradckpt, counting imports inside functions and under TYPE_CHECKING.

The graph is built from the source with :mod:`ast` (nothing is imported), over whatever modules
and subpackages the package holds, so it follows modules when they move. A cycle is named module
by module; the synthetic package below shows the detector finds one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_gradckpt

Graph = dict[str, set[str]]


def module_names(root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under package directory ``root``: dotted name -> (file, is a package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported_names(tree: ast.AST, package: list[str]) -> list[str]:
    """Every dotted name an import anywhere in ``tree`` may load (``from a import b`` may load
    ``a.b``); ``package``: the package relative imports start from."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: Path) -> Graph:
    """Module -> the package's own modules it imports (at any depth of its code)."""
    modules = module_names(root)
    graph: Graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        for imported in imported_names(ast.parse(path.read_text(encoding="utf-8")), package):
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:  # `from m import function` loads m
                parts.pop()
            if parts and ".".join(parts) != name:
                graph[name].add(".".join(parts))
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as a closed path of modules, or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_pytest_gradckpt_has_no_import_cycle() -> None:
    graph = import_graph(Path(pytest_gradckpt.__file__).parent)
    assert len(graph) > 50 and any(graph.values())  # the whole package was read, imports were seen
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_detector_finds_a_cycle_through_a_function_and_type_checking(tmp_path: Path) -> None:
    package = tmp_path / "tiny"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from tiny.sub import b\n")
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n")
    (package / "c.py").write_text("from . import a\nclass C: ...\n")
    (package / "d.py").write_text("from tiny.c import C\n")  # imports into the cycle, not part of it
    graph = import_graph(package)
    assert graph["tiny.d"] == {"tiny.c"}
    assert find_cycle(graph) == ["tiny.a", "tiny.sub.b", "tiny.c", "tiny.a"]
    (package / "c.py").write_text("class C: ...\n")
    assert find_cycle(import_graph(package)) is None
