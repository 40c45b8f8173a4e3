"""The folders import each other in one direction only.

Layers, bottom to top, as they stand: ``model``; ``cluster`` (storage, hardware, planner,
cluster lifecycle); ``monitoring``; ``data_pipeline`` (its jobs export metrics); ``jobs``.
The test fails on any cycle. The graph is built from the AST of
every module and counts every import: top-level, inside functions and under
``TYPE_CHECKING`` (a type-only import still ties the folders together).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "data_pipeline", "cluster", "monitoring", "jobs")


def _module_name(path: Path) -> list[str]:
    parts = ["crucible", *path.relative_to(ROOT).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with the line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            # `from crucible.cluster import local` imports crucible.cluster.local
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _graph(unit) -> dict[str, dict[str, list[str]]]:
    """unit(module name parts) -> node or None; edges with the import lines behind them."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            src = unit(_module_name(path))
            for name, line in _imports(path):
                dst = unit(name.split("."))
                site = f"{path.relative_to(ROOT)}:{line}"
                if src and dst and dst != src and site not in edges[src][dst]:
                    edges[src][dst].append(site)
    return edges


def _cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every elementary cycle's nodes, found by depth-first search from each node."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in edges.get(node, {}):
            if nxt == start:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append([*path, start])
            elif nxt not in path and nxt > start:
                visit(start, nxt, [*path, nxt])

    for start in sorted(edges):
        visit(start, start, [start])
    return found


def _explain(edges: dict[str, dict[str, list[str]]], cycle: list[str]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in pairwise(cycle):
        lines += [f"  {a} -> {b}: {site}" for site in edges[a][b][:3]]
    return "\n".join(lines)


def _folder(parts: list[str]) -> str | None:
    if len(parts) > 1 and parts[0] == "crucible" and parts[1] in FOLDERS:
        return parts[1]
    return None


def test_no_import_cycle_between_folders() -> None:
    edges = _graph(_folder)
    cycles = _cycles(edges)
    assert not cycles, "\n".join(_explain(edges, c) for c in cycles)


LAYERS = ("model", "cluster", "monitoring", "data_pipeline", "jobs")  # bottom to top


def test_each_folder_imports_only_the_layers_below_it() -> None:
    edges = _graph(_folder)
    upward = [
        f"{src} -> {dst}: {', '.join(sites[:3])}"
        for src, dsts in edges.items()
        for dst, sites in dsts.items()
        if LAYERS.index(dst) > LAYERS.index(src)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_the_modules_of_model() -> None:
    # model/config.py (the spec sections) sits below model/parallelize.py (what applies them).
    def module(parts: list[str]) -> str | None:
        if parts[:2] == ["crucible", "model"] and len(parts) > 2:
            return parts[2]
        return None

    edges = _graph(module)
    cycles = _cycles(edges)
    assert not cycles, "\n".join(_explain(edges, c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges: dict[str, dict[str, list[str]]] = {
        "a": {"b": ["x"]},
        "b": {"c": ["y"]},
        "c": {"a": ["z"]},
        "d": {"a": ["w"]},
    }
    assert _cycles(edges) == [["a", "b", "c", "a"]]
