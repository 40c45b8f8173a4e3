"""The package's shape: only executors import Ray, executors know no stage, files stay short."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "data_pipeline"
RAY_ALLOWED = {"executors/ray.py"}
MAX_LINES = 400


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth: function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def modules() -> dict[str, Path]:
    return {p.relative_to(PACKAGE).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_only_executors_import_ray() -> None:
    assert set(modules()) >= RAY_ALLOWED
    offenders = {
        rel
        for rel, path in modules().items()
        if any(m == "ray" or m.startswith("ray.") for m in imports(path))
    }
    assert "executors/ray.py" in offenders  # the walk sees function-level imports
    assert offenders <= RAY_ALLOWED, f"only executors import Ray: {sorted(offenders - RAY_ALLOWED)}"


def test_executors_know_no_stage() -> None:
    stage_code = ("stages", "dedup", "filters", "readers.read", "shards", "tokens", "pipeline")
    for rel, path in modules().items():
        if rel.startswith("executors/"):
            known = {
                m
                for m in imports(path)
                if m.startswith("crucible.data_pipeline.")
                and m.removeprefix("crucible.data_pipeline.").startswith(stage_code)
            }
            assert not known, f"{rel} imports stage code {sorted(known)}"


def test_no_module_over_400_lines() -> None:
    long = {
        rel: n for rel, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
