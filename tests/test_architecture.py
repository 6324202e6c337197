"""The map in ARCHITECTURE.md is the truth: featx's own imports, read with ast (nothing is imported), must match it.

Folders follow the data flow; a folder imports only the folders below it that the map names, and inside a
folder a module imports only the modules listed below it. torch never reaches the head side.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featx"
HEAVY = {"torch", "torchvision", "timm"}
HEAD_SIDE = ("store", "heads", "comparison", "shift", "use.report")


def read_map() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(folder → the folders the map says it imports, top of the flow first; folder → its modules, top first)."""
    folders, modules, section = {}, {}, None
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        heading = re.match(r"### `(\w+)/?`", line)
        folder_row = re.match(r"\| `(\w+)/?` \| .* \| (.*) \|$", line)
        module_row = re.match(r"\| `(\w+)\.py` \| .* \|$", line)
        if heading:
            section = heading.group(1)
            modules[section] = []
        elif module_row and section:
            modules[section].append(module_row.group(1))
        elif folder_row and section is None:
            folders[folder_row.group(1)] = set(re.findall(r"`(\w+)`", folder_row.group(2)))
    return folders, modules


def module_names() -> set[str]:
    """Every featx module as ``folder.module`` (``module`` in the root), package ``__init__`` files left out."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] != "__init__":
            names.add(".".join(parts))
    return names


def imports_of(source: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(featx modules, heavy libraries) imported anywhere in ``source``, inside functions too. A name that is
    no module (the package, a folder's ``__init__``) is kept as it is written, so that it shows."""
    featx, heavy = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "featx":
                base = ".".join(parts[1:])
                for alias in node.names:
                    nested = f"{base}.{alias.name}".strip(".")
                    featx.add(nested if nested in known else base or "__init__")
            heavy |= {parts[0]} & HEAVY
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "featx":
                    featx.add(".".join(parts[1:]) or "__init__")
                heavy |= {parts[0]} & HEAVY
    return featx, heavy


def folder_of(module: str) -> str:
    return module.split(".")[0] if "." in module else "root"


def actual_graph() -> dict[str, tuple[set[str], set[str]]]:
    known = module_names()
    return {name: imports_of((PACKAGE / (name.replace(".", "/") + ".py")).read_text(), known) for name in known}


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


def test_the_checker_sees_cycles_nested_modules_and_lazy_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = ("import numpy\ndef f():\n    import torch.nn\n    from featx.store.embeddings import x\n"
              "    from featx.heads import serialize\n    from featx import errors\n    import featx\n"
              "    from featx.heads import something\n")
    known = {"store.embeddings", "heads.serialize", "errors"}
    assert imports_of(source, known) == ({"store.embeddings", "heads.serialize", "errors", "__init__", "heads"},
                                         {"torch"})
    assert folder_of("heads.serialize") == "heads" and folder_of("errors") == "root"


def test_no_import_cycle_between_modules_or_folders():
    graph = actual_graph()
    assert cycles({m: featx for m, (featx, _) in graph.items()}) == []
    folders = {}
    for module, (featx, _) in graph.items():
        folders.setdefault(folder_of(module), set()).update(folder_of(m) for m in featx
                                                            if folder_of(m) != folder_of(module))
    assert cycles(folders) == []


def test_every_module_is_on_the_map_in_its_folder():
    folders, modules = read_map()
    assert list(folders) == list(modules), "ARCHITECTURE.md's folder table and its folder sections differ"
    on_map = {(m if folder == "root" else f"{folder}.{m}") for folder, names in modules.items() for m in names}
    assert on_map == module_names(), "modules missing from (or extra in) ARCHITECTURE.md"
    on_disk = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert on_disk == set(folders) - {"root"}


def test_folders_import_only_the_folders_below_them_that_the_map_names():
    folders, _ = read_map()
    order = list(folders)
    actual = {folder: set() for folder in folders}
    for module, (featx, _) in actual_graph().items():
        assert not featx & ({"__init__"} | set(folders)), (
            f"{module} imports a package ({sorted(featx & ({'__init__'} | set(folders)))}); import the module")
        actual[folder_of(module)] |= {folder_of(m) for m in featx} - {folder_of(module)}
    for folder, imported in actual.items():
        upward = [f for f in imported if order.index(f) <= order.index(folder)]
        assert not upward, f"{folder}/ imports {upward}, listed at or above it in ARCHITECTURE.md"
        assert imported == folders[folder], (f"{folder}/ imports {sorted(imported)}; ARCHITECTURE.md says "
                                             f"{sorted(folders[folder])}")


def test_inside_a_folder_modules_import_only_the_modules_below_them():
    _, modules = read_map()
    for module, (featx, _) in actual_graph().items():
        folder, order = folder_of(module), modules[folder_of(module)]
        here = order.index(module.split(".")[-1])
        for target in featx:
            if folder_of(target) == folder:
                assert order.index(target.split(".")[-1]) > here, (
                    f"{module} imports {target}, listed above it in ARCHITECTURE.md's {folder} section")


def test_each_folder_says_what_its_stage_does_and_imports_nothing():
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} has no docstring"
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], (
            f"{init} imports: importing a folder must not load its modules (torch, scikit-learn)")


@pytest.mark.parametrize("side", HEAD_SIDE)
def test_the_head_side_never_reaches_torch(side):
    graph = actual_graph()
    reached, todo = set(), [m for m in graph if m == side or m.startswith(side + ".")]
    assert todo, side
    while todo:
        current = todo.pop()
        if current not in reached:
            reached.add(current)
            todo += graph[current][0]
    carriers = {m: sorted(graph[m][1]) for m in sorted(reached) if graph[m][1]}
    assert not carriers, f"{side} reaches {carriers}"
