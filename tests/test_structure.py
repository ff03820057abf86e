"""The package's shape: no import circle among the modules of src/dyntrm, counting every import anywhere in a file
(module level, inside functions, under ``TYPE_CHECKING``), so that imports run one way."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC, package: str = "dyntrm") -> dict[str, set[str]]:
    """Module -> the package's modules it imports. ``from .x import y`` names module ``x.y`` where that exists, else
    ``x``; importing a module also runs its packages' ``__init__`` (except the importer's own packages, which are
    running already)."""
    files = {module_name(p, src): p for p in (src / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # what `from .` means in this file
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        edges = set()
        for t in targets:
            while t and t not in files:  # `import dyntrm.x.y as z` of a name inside a module: the module
                t = t.rpartition(".")[0]
            while t:
                if t != name and not name.startswith(t + "."):
                    edges.add(t)
                t = t.rpartition(".")[0]
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None (depth-first search)."""
    state, stack = {}, []  # state: 1 on the current path, 2 finished

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from ..top import Y\nX = 1\n")
    (pkg / "top.py").write_text("import os\n\ndef f():\n    from . import other\n    import pkg.sub.leaf as leaf\n")
    (pkg / "other.py").write_text("from .sub.leaf import X\nfrom pkg import top\n")
    assert import_graph(tmp_path, "pkg") == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},  # under TYPE_CHECKING
        "pkg.top": {"pkg.other", "pkg.sub", "pkg.sub.leaf"},  # inside a function; the package runs first
        "pkg.other": {"pkg.sub", "pkg.sub.leaf", "pkg.top"},
    }
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.other", "pkg.sub", "pkg.sub.leaf", "pkg.top",
                                                         "pkg.other"]


def test_no_import_circle_among_the_modules():
    graph = import_graph()
    assert {"dyntrm.model.generate", "dyntrm.model.context"} <= graph["dyntrm.model.dyntrm"]  # (it reads them)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
