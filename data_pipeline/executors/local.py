"""In-process executor: every stage in this process, in order (unit tests, debugging, laptops).

It calls exactly the functions the Ray executor distributes; only the grouping differs (one
call over the whole table instead of one per hash group).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible.data_pipeline.dedup.components import components_local
from crucible.data_pipeline.dedup.exact import exact_duplicates
from crucible.data_pipeline.dedup.lsh import bucket_edges, explode_bands
from crucible.data_pipeline.dedup.results import cluster_histogram, write_partitioned_local
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages import filter_part, finalize_part


def _read(files: list[Path], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


class LocalExecutor:
    """Runs the pipeline's stages in this process."""

    name = "local"

    def filter_parts(
        self,
        items: list[tuple[int, str]],
        spec: DataSpec,
        run_dir: Path,
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Filter each ``(part, path)``; ``on_done(part, stats)`` after each."""
        for part, path in items:
            on_done(part, filter_part(part, path, spec, run_dir))

    def exact_dedup(self, files: list[Path], out_dir: Path) -> dict[str, Any]:
        """Find exact duplicates among ``files`` and write ``{key, dup_of, part}``."""
        t = _read(files, ["key", "text_hash"])
        dups = exact_duplicates(
            {"key": t["key"].to_numpy(), "text_hash": t["text_hash"].to_numpy(zero_copy_only=False)}
        )
        write_partitioned_local(dups, out_dir)
        return {"duplicates": int(dups["key"].size)}

    def fuzzy_dedup(self, files: list[Path], out_dir: Path, spec: DataSpec) -> dict[str, Any]:
        """MinHash LSH + connected components; write ``{key, root, part}`` of non-survivors."""
        t = _read(files, ["key", "bands"])
        rows = explode_bands(
            {"key": t["key"].to_numpy(), "bands": t["bands"].to_numpy(zero_copy_only=False)}
        )
        edges = bucket_edges(rows)
        labels, rounds = components_local(edges, spec.dedup.minhash.max_rounds)
        if edges["a"].size == 0:
            labels, rounds = {"key": np.zeros(0, np.int64), "root": np.zeros(0, np.int64)}, 0
        write_partitioned_local(labels, out_dir)
        return {
            "edges": int(edges["a"].size),
            "rounds": rounds,
            "duplicates": int(labels["key"].size),
            "cluster_sizes": cluster_histogram(labels["root"]),
        }

    def finalize_parts(
        self,
        parts: list[int],
        spec: DataSpec,
        run_dir: Path,
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Write each part's documents and exclusions."""
        for part in parts:
            on_done(part, finalize_part(part, spec, run_dir))
