"""Print which modules of a package import which (module level and inside functions alike), and any cycle.

Imports under `if TYPE_CHECKING:` are left out: they serve annotations and never run.

    python scripts/import_graph.py            # trainer/
    python scripts/import_graph.py producer   # another package

Read from the source with `ast`, so nothing is imported. Exit status 1 when the graph has a cycle;
tests/test_structure.py runs the same check on trainer/ and producer/.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (`trainer.loop` -> {`trainer.config`, ...})."""
    graph = {}
    for path in sorted((REPO / package).glob("*.py")):
        module = f"{package}.{path.stem}" if path.stem != "__init__" else package
        found = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == package:  # `from trainer import distributed` names a module; `import X` a name
                    found |= {f"{package}.{a.name}" for a in node.names if (REPO / package / f"{a.name}.py").exists()}
                    found.add(package)
                elif node.module.startswith(package + "."):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(package + ".")}
        graph[module] = found - {module}
    return graph


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once, as a path that returns to its start (the package's __init__ excluded:
    `from trainer import TrainerError` from a submodule loads the package first, a cycle Python always allows)."""
    found, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
            elif nxt != node:
                visit(nxt, path + [nxt])

    package_inits = {m for m in graph if "." not in m}
    trimmed = {m: deps - package_inits for m, deps in graph.items() if m not in package_inits}
    graph = trimmed
    for start in sorted(graph):
        visit(start, [start])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="trainer")
    args = parser.parse_args()
    graph = imports(args.package)
    width = max(map(len, graph))
    for module, deps in graph.items():
        print(f"{module:<{width}} -> {', '.join(sorted(deps)) or '(nothing of {0})'.format(args.package)}")
    found = cycles(graph)
    for cycle in found:
        print("cycle: " + " -> ".join(cycle))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
