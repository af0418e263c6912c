"""The import graph points down only: no cycle between jaxrl's files or packages, lazy imports included.

Every `import` / `from ... import` in jaxrl is read with `ast` (module level and inside functions), so a
function-level import cannot hide a circle. Run as a script to print the graph's cycles and its lazy imports:
`python tests/test_imports.py`.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxrl"
# Where a function-level import of a jaxrl module is allowed: the CLI's router and commands import the
# chosen sub-command's dependencies late, so `jaxrl --help` stays instant; the package's lazy public API.
LAZY_OK = ("jaxrl", "jaxrl.cli", "jaxrl.commands")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict) -> str | None:
    """The jaxrl module `name` refers to (its longest prefix that is a module), or None outside jaxrl."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(modules: dict | None = None) -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, lazy) for every import of a jaxrl module inside jaxrl."""
    modules = modules or _modules()
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        top = {id(n) for n in tree.body}
        top |= {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}  # `if TYPE_CHECKING:`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from jaxrl.train import build` imports the module jaxrl.train.build
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                target = _resolve(t, modules)
                if target and target != name:
                    out.append((name, target, node.lineno, id(node) not in top))
    return out


def _unit(module: str) -> str:
    """A module's package (jaxrl.train.step -> jaxrl.train); a top-level file is its own unit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _lazy_in_library(found):
    return [(a, b, line) for a, b, line, lazy in found
            if lazy and not any(a == p or a.startswith(p + ".") for p in LAZY_OK if p != "jaxrl")
            and a != "jaxrl"]


def test_no_cycle_between_files():
    found = imports()
    assert cycles([(a, b) for a, b, _, _ in found]) == []


def test_no_cycle_between_packages():
    found = imports()
    edges = [(_unit(a), _unit(b)) for a, b, _, _ in found if _unit(a) != _unit(b)]
    assert cycles(edges) == []


def test_library_code_imports_jaxrl_at_the_top():
    assert _lazy_in_library(imports()) == []


def test_the_checker_sees_a_function_level_cycle(tmp_path):
    # A circle made only of function-level imports, as the one this test was written to catch.
    pkg = tmp_path / "jaxrl"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from jaxrl.b import y\n")
    (pkg / "b.py").write_text("from .a import x\n")
    modules = {_module_name_under(tmp_path, p): p for p in sorted(pkg.rglob("*.py"))}
    found = imports(modules)
    assert ("jaxrl.a.x", "jaxrl.b", 2, True) in found
    assert cycles([(a, b) for a, b, _, _ in found]) == [["jaxrl.a.x", "jaxrl.b"]]


def _module_name_under(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


if __name__ == "__main__":
    found = imports()
    print("file cycles:", *cycles([(a, b) for a, b, _, _ in found]), sep="\n  ")
    print("package cycles:", *cycles([(_unit(a), _unit(b)) for a, b, _, _ in found if _unit(a) != _unit(b)]),
          sep="\n  ")
    lazy = _lazy_in_library(found)
    print(f"function-level imports of jaxrl modules outside commands/ and cli.py: {len(lazy)}")
    for a, b, line in lazy:
        print(f"  {a}:{line} -> {b}")
    print(f"all function-level imports of jaxrl modules: {sum(1 for *_, lazy in found if lazy)}")
