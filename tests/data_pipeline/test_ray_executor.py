"""The Ray Data executor and the in-process executor give identical output.

One in-process run and one Ray run of the corpus (documents, then shards) are shared by the
module's tests; the Ray run has a small per-task budget, so its bucket shuffle is split into more partitions than CPUs
(the in-process executor is one partition), and the results must still be the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.run_dir import work_paths
from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.spec import DataSpec

SMALL_PARTITION = 160 << 10
SHARDS = {
    "seq_len": 32,
    "rows_per_shard": 100,
    "heldout_fraction": 0.05,
    "tokenizer": {"train": {"vocab_size": 320}},
}


def tables(run_dir: Path, sub: str) -> list[list[dict]]:
    return [pq.read_table(f).to_pylist() for f in sorted((run_dir / sub).glob("part-*.parquet"))]


def dedup_rows(run_dir: Path, kind: str) -> list[dict]:
    """Every row of a run's committed dedup result (hive-partitioned by part), in a fixed
    order."""
    dedup = run_dir / "_work" / "dedup"
    result = json.loads((dedup / f"{kind}.json").read_text())["result"]
    files = sorted((dedup / result).rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


@pytest.fixture(scope="module")
def runs(
    corpus: dict[str, Any], ray_local: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``{name: (run dir, stats)}`` of an in-process and a Ray run of the corpus."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    small = {"partition_bytes": SMALL_PARTITION, "num_workers": 1}
    for name, extra in (("local", {}), ("ray", small)):
        spec = DataSpec(inputs=[str(corpus["dir"])], shards=SHARDS, **extra)
        out[name] = (root / name, run_pipeline(spec, root / name, executor=name, progress=False))
    return out


@pytest.mark.slow
def test_ray_equals_local(runs: dict[str, Any]) -> None:
    (local_dir, local), (ray_dir, ray) = runs["local"], runs["ray"]
    assert tables(local_dir, "documents") == tables(ray_dir, "documents")
    assert tables(local_dir, "exclusions") == tables(ray_dir, "exclusions")
    for k in ("steps", "drops", "languages", "duplicate_clusters", "totals"):
        assert json.dumps(local[k], sort_keys=True) == json.dumps(ray[k], sort_keys=True), k
    assert ray["dedup"]["minhash"]["rounds"] >= 1
    for k in ("edges", "exact_checked", "exact_kept", "duplicates", "cluster_sizes"):
        assert local["dedup"]["minhash"][k] == ray["dedup"]["minhash"][k], k
    assert local["dedup"]["exact"] == ray["dedup"]["exact"]
    # candidates near the threshold took the exact check's two shuffles on Ray too
    assert ray["dedup"]["minhash"]["exact_checked"] > 0
    assert ray["dedup"]["minhash"]["duplicates"] > 0
    for kind in ("exact", "minhash"):
        assert dedup_rows(local_dir, kind) == dedup_rows(ray_dir, kind), kind


@pytest.mark.slow
def test_ray_builds_the_same_shards_as_local(runs: dict[str, Any]) -> None:
    """Tokenize, pack (a task per file) and the shard shuffle through the Ray executor."""
    local, ray = (read_manifest(runs[k][0] / "shards") for k in ("local", "ray"))
    a, b = (m.model_dump(mode="json") for m in (local, ray))
    assert a.pop("spec_hash") != b.pop("spec_hash")  # the specs differ in Ray's settings only
    assert a == b  # every shard's sha256, the tokenizer, the totals
    assert sum(len(s.shards) for s in ray.splits.values()) > 2  # the shuffle wrote several
    got = json.loads((runs["ray"][0] / "shards" / "dataset_dict.json").read_text())
    assert got == {"splits": ["train", "heldout"]}


@pytest.fixture(scope="module")
def filtered(runs: dict[str, Any]) -> list[Location]:
    """The corpus's filtered parts (the dedup stages' input)."""
    return work_paths(location(runs["local"][0]))["filtered"].glob("part-*.parquet")


@pytest.mark.slow
def test_small_budget_splits_the_bucket_shuffle(
    corpus: dict[str, Any], filtered: list[Location], ray_local: Any
) -> None:
    """Partitions are computed from the data size: the shared Ray run's budget splits the
    bucket shuffle into more partitions than CPUs (and its results equal the in-process
    executor's one partition, above); with the default budget it fits in one, which is one
    block in one task, without a hash shuffle."""
    from crucible.data_pipeline.batches import num_rows
    from crucible.data_pipeline.dedup.fuzzy import band_row_bytes
    from crucible.data_pipeline.executors.ray import RayExecutor

    mh = DataSpec(inputs=[str(corpus["dir"])]).dedup.minhash
    big, small = RayExecutor(), RayExecutor(partition_bytes=SMALL_PARTITION)
    nbytes = num_rows(filtered) * mh.num_bands * band_row_bytes(mh)
    assert small._partitions(nbytes) > small.partitions and big._partitions(nbytes) == 1
    one = big.from_batch({"k": np.arange(100)})
    seen = big.shuffle(one, ["k"], _block_stats, nbytes=800, batch_format="pyarrow")
    assert [b["rows"] for b in big.take_all(seen)] == [100]


def _block_stats(table: Any) -> dict[str, list[int]]:
    return {"bytes": [table.nbytes], "rows": [table.num_rows]}


@pytest.mark.slow
def test_band_rows_in_bounded_blocks(
    corpus: dict[str, Any], filtered: list[Location], ray_local: Any
) -> None:
    """The bucket shuffle's input comes in blocks of about ``block_bytes`` however big a part
    is: a shuffle map task holds several times its input, which had grown to whole parts."""
    from ray.data.context import MAX_SAFE_BLOCK_SIZE_FACTOR

    from crucible.data_pipeline.batches import num_rows
    from crucible.data_pipeline.dedup.fuzzy import band_rows
    from crucible.data_pipeline.executors.ray import RayExecutor

    mh = DataSpec(inputs=[str(corpus["dir"])]).dedup.minhash
    ex = RayExecutor(partition_bytes=256 << 10)
    blocks = band_rows(ex, filtered, mh).map_batches(
        _block_stats, batch_size=None, batch_format="pyarrow"
    )
    got = blocks.take_all()
    assert sum(b["rows"] for b in got) == num_rows(filtered) * mh.num_bands
    # each part explodes to several blocks' worth, so a block per part would break the bound
    assert sum(b["bytes"] for b in got) > 4 * ex.block_bytes * len(filtered)
    # Ray Data slices a block once it reaches this factor of its target size
    assert max(b["bytes"] for b in got) <= MAX_SAFE_BLOCK_SIZE_FACTOR * ex.block_bytes


def test_partition_bytes_too_small() -> None:
    pytest.importorskip("ray")
    from crucible.data_pipeline.executors.ray import RayExecutor
    from crucible.errors import CrucibleError

    with pytest.raises(CrucibleError, match="partition_bytes"):
        RayExecutor(partition_bytes=100)  # checked before Ray is started


def test_a_task_hands_memory_back_before_and_after_its_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: what an earlier task of the worker (a shuffle's reduce) left; after: its own."""
    pytest.importorskip("ray")
    import json

    from crucible.data_pipeline.executors import ray as ray_executor

    calls: list[str] = []
    monkeypatch.setattr(ray_executor, "_release_memory", lambda: calls.append("release"))

    def fn(item: dict[str, Any]) -> dict[str, Any]:
        calls.append(f"part {item['part']}")
        return {"ok": item["part"]}

    out = ray_executor._task({"seq": 7, "item": json.dumps({"part": 3})}, fn)
    assert out == {"seq": 7, "result": json.dumps({"ok": 3})}
    assert calls == ["release", "part 3", "release"]
