"""The import graph of coup_fast: which module imports which, and where imports run in a circle.

    python tests/import_graph.py            # edges per module ('*' marks an import inside a function)
    python tests/import_graph.py --cycles   # only the cycles

Read from the source with `ast` (nothing is imported).  An import inside a function still makes a
dependency, so cycles are reported over all edges; tests/test_layers.py asserts there are none.
"""
from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "coup_fast")


def modules(root: str = ROOT) -> dict:
    """{dotted module name: file path} for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges(root: str = ROOT) -> dict:
    """{module: {imported coup_fast module: True if only imported inside a function}} (a module's own
    parent packages are left out: importing a module runs them first whatever it imports)."""
    mods = modules(root)
    out = {}
    for module, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        deps = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, path.endswith("__init__.py"), node)
                names = [f"{target}.{a.name}" for a in node.names]
                found = [n for n in names if n in mods] or ([target] if target in mods else [])
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name in mods]
            else:
                continue
            local = _inside_function(tree, node)
            for dep in found:
                # a module's own packages run before it anyway (e.g. `from . import _C`, the compiled extension)
                if dep != module and not module.startswith(dep + "."):
                    deps[dep] = deps.get(dep, True) and local
        out[module] = deps
    return out


def _inside_function(tree, target) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(n is target for n in ast.walk(node)):
            return True
    return False


def cycles(graph: dict) -> list:
    """Every elementary cycle's smallest rotation, found by depth-first search (the graph is small)."""
    found = set()

    def visit(path):
        for dep in graph.get(path[-1], {}):
            if dep == path[0]:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif dep not in path and dep > path[0]:
                visit(path + [dep])

    for start in graph:
        visit([start])
    return sorted(found)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    graph = edges()
    if "--cycles" not in argv:
        for module in sorted(graph):
            deps = ", ".join(f"{d}{'*' if local else ''}" for d, local in sorted(graph[module].items()))
            print(f"{module} -> {deps}" if deps else module)
    found = cycles(graph)
    print(f"\n{len(found)} cycle(s)" + "".join(f"\n  {' -> '.join(c + (c[0],))}" for c in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
