"""The project's import graph, read from the source with `ast` (nothing is imported or run).

Every `import classifier...` and `from classifier... import ...` counts, at any depth: an import
inside a function is an edge like any other, so it cannot hide a cycle. Used by tests/test_house.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "classifier"
CLI = f"{PACKAGE}.cli"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _targets(node: ast.AST, modules: set[str]) -> set[str]:
    """The project modules an import statement loads (a name imported from a package counts as its
    submodule when there is one)."""
    found = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                found.add(alias.name)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == PACKAGE or node.module.startswith(PACKAGE + "."):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the project modules it imports} for every module under root/classifier."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(root, f) for f in files}
    graph = {}
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        name = module_name(root, path)
        edges = set()
        for node in ast.walk(tree):
            edges |= _targets(node, modules)
        edges.discard(name)
        edges.discard(PACKAGE)  # the package's face (registering the models) is imported by everything
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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
    return sorted(found)


def is_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".") or module == f"{PACKAGE}.__main__"


def library_imports_of_cli(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(library module, command-line module) for every import that runs from the library up."""
    return sorted((module, target) for module, targets in graph.items() if not is_cli(module)
                  for target in targets if is_cli(target))
