"""The package's import graph: no cycles, and every arrow points down the layers (issue 9's one-way house).

Imports inside functions count too: a lazy import is still a dependency, it only moves the cost.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "clt_pipe"

# Units side by side on one rank must not import each other; a unit imports its own modules and lower ranks.
RANKS = {
    "errors": -1, "device": 0, "checksums": 0, "atomic": 0, "precision": 0, "progress": 0, "prefetch": 0, "tokens": 0,
    "signals": 0,
    "__init__": 0,
    "datasets": 1, "store": 1, "clt": 1, "backbone": 2, "outdir": 2,
    "config": 3, "testing": 3,
    "harvest": 4, "fit": 4, "analyze": 4, "preflight": 4,
    "pipeline": 5,
    "demo": 6,
    "cli": 7, "__main__": 8,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_rank():
    assert {unit(m) for m in import_graph()} <= set(RANKS), "give new top-level modules/packages a rank"


def test_no_arrow_points_up_or_sideways():
    bad = []
    for mod, deps in import_graph().items():
        for dep in deps:
            if unit(dep) != unit(mod) and RANKS[unit(dep)] >= RANKS[unit(mod)] and unit(dep) != "__init__":
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
