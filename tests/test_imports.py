"""The import graph of the jacrun package has no cycle (module-level and function-level imports)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jacrun"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _executed(tree: ast.AST):
    """Every node that can run: all of the tree but ``if TYPE_CHECKING:`` bodies (type-only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield child
                yield from _executed(child)
            continue
        yield node
        yield from _executed(node)


def _target(name: str) -> str | None:
    """The jacrun module an import of ``name`` executes (the nearest enclosing module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The jacrun modules that ``module`` imports, at module level or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _executed(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name`, pkg
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        found.update(target for target in map(_target, names) if target and target != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_graph_sees_the_imports_it_should():
    assert "jacrun.functions.targets" in GRAPH["jacrun.functions.python"]
    assert "jacrun.functions.targets" in GRAPH["jacrun.functions.adapters"]
    assert "jacrun.functions.adapters" in GRAPH["jacrun.functions.python"]  # inside functions
    assert "jacrun.functions.adapters" in GRAPH["jacrun.functions.adapters.torch"]


def test_python_and_adapters_do_not_import_each_other():
    assert "jacrun.functions.python" not in GRAPH["jacrun.functions.adapters"]
    assert "jacrun.functions.python" not in GRAPH["jacrun.functions.targets"]
    assert "jacrun.functions.adapters" not in GRAPH["jacrun.functions.targets"]


def test_the_import_graph_of_jacrun_has_no_cycle():
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
