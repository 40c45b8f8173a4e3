"""Where dedup results go: Parquet partitioned by input part (``part=<p>/``), committed by
renaming the finished directory, plus the cluster-size histogram."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible.data_pipeline.document import ROW_BITS


def with_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the ``part`` column (the input part each key came from)."""
    out = dict(batch)
    out["part"] = (np.asarray(batch["key"], np.int64) >> ROW_BITS).astype(np.int64)
    return out


def write_partitioned_local(table: dict[str, np.ndarray], final_dir: Path) -> None:
    """Write ``table`` (with ``key``) partitioned by part into ``final_dir``, atomically."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t = pa.table(with_part(table))
    if t.num_rows:
        t = t.sort_by("key")
        pq.write_to_dataset(
            t, str(tmp), partition_cols=["part"], basename_template="data-{i}.parquet"
        )
    commit_dir(tmp, final_dir)


def commit_dir(tmp: Path, final_dir: Path) -> None:
    """Replace ``final_dir`` by the finished ``tmp`` directory."""
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)


def cluster_histogram(roots: np.ndarray) -> dict[str, int]:
    """``{cluster size: number of clusters}`` from the root of every non-root member."""
    if roots.size == 0:
        return {}
    _, members = np.unique(roots, return_counts=True)
    sizes, counts = np.unique(members + 1, return_counts=True)
    return {str(int(s)): int(c) for s, c in zip(sizes, counts, strict=True)}
