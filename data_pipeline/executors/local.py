"""In-process executor: every stage in this process, in order (unit tests, debugging, laptops).

It calls exactly the functions the Ray executor distributes; only the grouping differs (one
call over the whole table instead of one per hash group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crucible.cluster.storage import Location
from crucible.data_pipeline.dedup.components import components_local
from crucible.data_pipeline.dedup.exact import exact_duplicates
from crucible.data_pipeline.dedup.lsh import bucket_edges, explode_bands
from crucible.data_pipeline.dedup.results import cluster_histogram, write_partitioned_local
from crucible.data_pipeline.dedup.verify import (
    attach_text,
    doc_rows,
    exact_edges,
    pair_ends,
    unique_pairs,
)
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages import filter_part, finalize_part

_ROWS_PER_SLICE = 1 << 18  # bucket rows verified at once (each carries its signature)


def _read(files: list[Location], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(f.open_read(), columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _list_matrix(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A column of equal-length lists as a 2-D array, without a Python loop per row."""
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=dtype)
    return arr.flatten().to_numpy().astype(dtype, copy=False).reshape(len(arr), -1)


def _verified_edges(
    rows: dict[str, np.ndarray], sigs: np.ndarray, threshold: float, margin: float
) -> dict:
    """:func:`bucket_edges` over rows sorted by bucket, in slices of whole buckets, so only
    one slice's signatures are copied onto bucket rows at a time."""
    buckets = rows["bucket"]
    out: dict[str, list[np.ndarray]] = {"a": [], "b": [], "sure": []}
    s = 0
    while s < buckets.size:
        e = min(s + _ROWS_PER_SLICE, buckets.size)
        # extend the slice to the end of its last bucket
        e = int(np.searchsorted(buckets, buckets[e - 1], side="right"))
        sl = slice(s, e)
        got = bucket_edges(
            {"bucket": buckets[sl], "key": rows["key"][sl], "signature": sigs[rows["row"][sl]]},
            threshold,
            margin,
        )
        for k, v in got.items():
            out[k].append(v)
        s = e
    empty = {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "sure": np.zeros(0, bool)}
    return {k: np.concatenate([empty[k], *v]) for k, v in out.items()}


def _exact_check(files: list[Location], pairs: dict, n_grams: int, threshold: float) -> dict:
    """:func:`exact_edges` of ``pairs`` (``kept``: exact Jaccard reaches ``threshold``); only
    the texts of their documents are read."""
    if pairs["a"].size == 0:
        return {**pairs, "kept": np.zeros(0, bool)}
    needed = pa.array(np.unique(np.concatenate([pairs["a"], pairs["b"]])))
    docs = []
    for f in files:
        t = pq.read_table(f.open_read(), columns=["key", "text"])
        t = t.filter(pc.is_in(t["key"], value_set=needed))
        docs.append(
            doc_rows({"key": t["key"].to_numpy(), "text": t["text"].to_numpy(zero_copy_only=False)})
        )
    rows = {k: np.concatenate([d[k] for d in [pair_ends(pairs), *docs]]) for k in docs[0]}
    return exact_edges(attach_text(rows), n_grams, threshold)


class LocalExecutor:
    """Runs the pipeline's stages in this process."""

    name = "local"

    def filter_parts(
        self,
        items: list[tuple[int, str]],
        spec: DataSpec,
        run_dir: Location,
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Filter each ``(part, path)``; ``on_done(part, stats)`` after each."""
        for part, path in items:
            on_done(part, filter_part(part, path, spec, run_dir))

    def map(self, fn: Callable[[dict], dict], items: list[dict]) -> list[dict]:
        """``fn`` on each item, in order; the results in item order."""
        return [fn(item) for item in items]

    def map_reduce(
        self,
        items: list[dict],
        map_fn: Callable[[dict], pa.Table],
        key: str,
        reduce_fn: Callable[[pa.Table], pa.Table],
        partitions: int,
    ) -> list[dict]:
        """Rows from ``map_fn`` of each item, every group of equal ``key`` handed whole to
        ``reduce_fn`` (in-process: all rows in one call); its result rows.

        Args:
            items: inputs of the map side.
            map_fn: item -> a table of rows, ``key`` among their columns.
            key: the grouping column.
            reduce_fn: a table of whole groups -> a table of result rows.
            partitions: ignored in-process (one partition).
        """
        tables = [t for t in (map_fn(item) for item in items) if t.num_rows]
        if not tables:
            return []
        return reduce_fn(pa.concat_tables(tables)).to_pylist()

    def exact_dedup(self, files: list[Location], out_dir: Location) -> dict[str, Any]:
        """Find exact duplicates among ``files`` and write ``{key, dup_of, part}``."""
        t = _read(files, ["key", "text_hash"])
        dups = exact_duplicates(
            {"key": t["key"].to_numpy(), "text_hash": t["text_hash"].to_numpy(zero_copy_only=False)}
        )
        write_partitioned_local(dups, out_dir)
        return {"duplicates": int(dups["key"].size)}

    def fuzzy_dedup(
        self, files: list[Location], out_dir: Location, spec: DataSpec
    ) -> dict[str, Any]:
        """MinHash LSH + verification + connected components; write ``{key, root, part}`` of
        non-survivors."""
        t = _read(files, ["key", "bands", "signature"])
        sigs = _list_matrix(t["signature"], np.uint32)
        rows = explode_bands(
            {
                "key": t["key"].to_numpy(),
                "bands": _list_matrix(t["bands"], np.uint64),
                "row": np.arange(t.num_rows),
            }
        )
        del t
        order = np.argsort(rows["bucket"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        mh = spec.dedup.minhash
        checked = _verified_edges(rows, sigs, mh.threshold, mh.margin)
        del rows, sigs
        sure = checked["sure"]
        unsure = unique_pairs({"a": checked["a"][~sure], "b": checked["b"][~sure]})
        exact = _exact_check(files, unsure, mh.n_grams, mh.threshold)
        edges = {
            "a": np.concatenate([checked["a"][sure], exact["a"][exact["kept"]]]),
            "b": np.concatenate([checked["b"][sure], exact["b"][exact["kept"]]]),
        }
        labels, rounds = components_local(edges, spec.dedup.minhash.max_rounds)
        if edges["a"].size == 0:
            labels, rounds = {"key": np.zeros(0, np.int64), "root": np.zeros(0, np.int64)}, 0
        write_partitioned_local(labels, out_dir)
        return {
            "edges": int(edges["a"].size),
            "exact_checked": int(exact["a"].size),
            "exact_kept": int(exact["kept"].sum()),
            "rounds": rounds,
            "duplicates": int(labels["key"].size),
            "cluster_sizes": cluster_histogram(labels["root"]),
        }

    def finalize_parts(
        self,
        parts: list[int],
        spec: DataSpec,
        run_dir: Location,
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Write each part's documents and exclusions."""
        for part in parts:
            on_done(part, finalize_part(part, spec, run_dir))
