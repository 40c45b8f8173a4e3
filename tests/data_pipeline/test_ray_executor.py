"""The Ray Data executor and the in-process executor give identical output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from crucible.cluster.storage import Location, location
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


def dedup_rows(out_dir: Path) -> list[dict]:
    """Every row of a dedup result folder (hive-partitioned by part), in a fixed order."""
    files = sorted(out_dir.rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


@pytest.fixture(scope="module")
def filtered(corpus: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[Location]:
    """The corpus's filtered parts (the dedup stages' input), from the in-process executor."""
    from crucible.data_pipeline.stages import work_paths

    run = location(tmp_path_factory.mktemp("filtered") / "run")
    run_pipeline(DataSpec(inputs=[str(corpus["dir"])]), run, executor="local", progress=False)
    return work_paths(run)["filtered"].glob("part-*.parquet")


@pytest.mark.slow
def test_small_partitions_same_dedup(
    corpus: dict[str, Any], filtered: list[Location], ray_local: Any, tmp_path: Path
) -> None:
    """Partitions computed from the data size: a tiny per-task budget splits every groupby into
    many partitions (more than CPUs) and the dedup results are unchanged."""
    from crucible.data_pipeline.executors.ray import RayExecutor, _num_rows

    spec = DataSpec(inputs=[str(corpus["dir"])])
    files = filtered
    big, small = RayExecutor(), RayExecutor(partition_bytes=64 << 10)
    # the bucket shuffle: 14 bands, each row carrying a 112-value uint32 signature
    assert small._partitions(_num_rows(files) * 14 * 464) > 2 * big.partitions
    got = {}
    for name, ex in (("big", big), ("small", small)):
        got[name] = (
            ex.exact_dedup(files, location(tmp_path / name / "exact")),
            ex.fuzzy_dedup(files, location(tmp_path / name / "minhash"), spec),
        )
    assert got["big"][0] == got["small"][0]
    for k in ("edges", "exact_checked", "exact_kept", "duplicates", "cluster_sizes"):
        assert got["big"][1][k] == got["small"][1][k], k
    assert got["big"][1]["duplicates"] > 0
    for kind in ("exact", "minhash"):
        assert dedup_rows(tmp_path / "big" / kind) == dedup_rows(tmp_path / "small" / kind), kind


def _block_stats(table: Any) -> dict[str, list[int]]:
    return {"bytes": [table.nbytes], "rows": [table.num_rows]}


@pytest.mark.slow
def test_band_rows_in_bounded_blocks(
    corpus: dict[str, Any], filtered: list[Location], ray_local: Any
) -> None:
    """The bucket shuffle's input comes in blocks of about ``block_bytes`` however big a part
    is: a shuffle map task holds several times its input, which had grown to whole parts."""
    from ray.data.context import MAX_SAFE_BLOCK_SIZE_FACTOR

    from crucible.data_pipeline.executors.ray import RayExecutor, _num_rows

    mh = DataSpec(inputs=[str(corpus["dir"])]).dedup.minhash
    ex = RayExecutor(partition_bytes=256 << 10)
    blocks = ex._band_rows(filtered, mh).map_batches(
        _block_stats, batch_size=None, batch_format="pyarrow"
    )
    got = blocks.take_all()
    assert sum(b["rows"] for b in got) == _num_rows(filtered) * mh.num_bands
    # each part explodes to several blocks' worth, so a block per part would break the bound
    assert sum(b["bytes"] for b in got) > 4 * ex.block_bytes * len(filtered)
    # Ray Data slices a block once it reaches this factor of its target size
    assert max(b["bytes"] for b in got) <= MAX_SAFE_BLOCK_SIZE_FACTOR * ex.block_bytes


def test_partition_bytes_too_small(ray_local: Any) -> None:
    from crucible.data_pipeline.executors.ray import RayExecutor
    from crucible.errors import CrucibleError

    with pytest.raises(CrucibleError, match="partition_bytes"):
        RayExecutor(partition_bytes=100)


def _pool_and_pid(row: dict[str, Any]) -> dict[str, Any]:
    import os

    return {"part": row["part"], "pool": os.environ.get("CRUCIBLE_WORKER_POOL", ""),
            "pid": os.getpid()}  # fmt: skip


@pytest.mark.slow
def test_per_part_tasks_run_in_their_own_worker_pool(ray_local: Any) -> None:
    """Per-part tasks never share a process with shuffle tasks, whose heap they would keep."""
    import ray

    from crucible.data_pipeline.executors.ray import RayExecutor

    ex = RayExecutor()
    rows = ex._per_part([{"part": i} for i in range(4)], _pool_and_pid).take_all()
    assert sorted(r["part"] for r in rows) == [0, 1, 2, 3]
    assert {r["pool"] for r in rows} == {"per-part"}
    other = ray.get(ray.remote(lambda: __import__("os").getpid()).remote())
    assert other not in {r["pid"] for r in rows}
