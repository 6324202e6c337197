"""The map in ARCHITECTURE.md is the truth: featx's own imports, read with ast (nothing is imported), must match it."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featx"
HEAVY = {"torch", "torchvision", "timm"}
HEAD_SIDE = ("store", "heads", "metrics", "evaluate", "runs", "openset", "report", "audit", "adapt")


def read_map() -> dict[str, set[str]]:
    """Module → the featx modules ARCHITECTURE.md says it imports, in the table's order."""
    table = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        row = re.match(r"\| `(\w+)\.py` \|.*\| (.*) \|$", line)
        if row:
            table[row.group(1)] = set(re.findall(r"`(\w+)`", row.group(2)))
    return table


def imports_of(source: str) -> tuple[set[str], set[str]]:
    """(featx modules, heavy libraries) imported anywhere in ``source``, inside functions too."""
    featx, heavy = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "featx":
                featx |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            heavy |= {parts[0]} & HEAVY
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "featx":
                    featx.add(parts[1] if len(parts) > 1 else "__init__")
                heavy |= {parts[0]} & HEAVY
    return featx, heavy


def actual_graph() -> dict[str, tuple[set[str], set[str]]]:
    return {p.stem: imports_of(p.read_text()) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by depth-first search (each reported once, from its first module)."""
    found, done = [], set()

    def visit(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                if min(cycle) == cycle[0]:
                    found.append(cycle + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(edges):
        visit(start, [start])
    return found


def test_the_checker_sees_cycles_and_lazy_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = "import numpy\ndef f():\n    import torch.nn\n    from featx.store import x\n    import featx\n"
    assert imports_of(source) == ({"store", "__init__"}, {"torch"})


def test_no_import_cycle():
    graph = actual_graph()
    assert cycles({m: featx for m, (featx, _) in graph.items()}) == []


def test_every_module_is_on_the_map_in_its_place():
    table, graph = read_map(), actual_graph()
    assert set(table) == set(graph), "modules missing from (or extra in) ARCHITECTURE.md"
    order = list(table)
    for module, (featx, _) in graph.items():
        assert "__init__" not in featx, f"{module} imports the featx package itself; import the module"
        upward = [m for m in featx if order.index(m) >= order.index(module)]
        assert not upward, f"{module} imports {upward}, listed at or below it in ARCHITECTURE.md"
        assert featx == table[module], (f"{module} imports {sorted(featx)}; ARCHITECTURE.md says "
                                        f"{sorted(table[module])}")


@pytest.mark.parametrize("module", HEAD_SIDE)
def test_the_head_side_never_reaches_torch(module):
    graph = actual_graph()
    reached, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in reached:
            reached.add(current)
            todo += graph[current][0]
    carriers = {m: sorted(graph[m][1]) for m in sorted(reached) if graph[m][1]}
    assert not carriers, f"{module} reaches {carriers}"
