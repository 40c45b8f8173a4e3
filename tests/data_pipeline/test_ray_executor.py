"""The Ray Data executor and the in-process executor give identical output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from crucible.data_pipeline.run import run_pipeline
from crucible.data_pipeline.spec import DataSpec


def tables(run_dir: Path, sub: str) -> list[list[dict]]:
    return [pq.read_table(f).to_pylist() for f in sorted((run_dir / sub).glob("part-*.parquet"))]


@pytest.mark.slow
def test_ray_equals_local(corpus: dict[str, Any], ray_local: Any, tmp_path: Path) -> None:
    spec = DataSpec(inputs=[str(corpus["dir"])])
    local = run_pipeline(spec, tmp_path / "local", executor="local", progress=False)
    ray = run_pipeline(spec, tmp_path / "ray", executor="ray", progress=False)
    assert tables(tmp_path / "local", "documents") == tables(tmp_path / "ray", "documents")
    assert tables(tmp_path / "local", "exclusions") == tables(tmp_path / "ray", "exclusions")
    for k in ("steps", "drops", "languages", "duplicate_clusters", "totals"):
        assert json.dumps(local[k], sort_keys=True) == json.dumps(ray[k], sort_keys=True), k
    assert ray["dedup"]["minhash"]["rounds"] >= 1
    # candidates near the threshold took the exact check's two groupbys on Ray too
    assert ray["dedup"]["minhash"]["exact_checked"] == local["dedup"]["minhash"]["exact_checked"]
    assert ray["dedup"]["minhash"]["exact_checked"] > 0
