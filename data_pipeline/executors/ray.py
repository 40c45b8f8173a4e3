"""Ray Data executor: the same stages as the in-process executor, distributed.

- filter / final: one Ray Data task per input part (streamed, a few in flight per CPU);
- exact dedup: a reduce by ``text_hash`` (a hash-partitioned shuffle, see
  :meth:`RayExecutor._reduce`);
- MinHash: band keys exploded (each row carrying its document's signature), a reduce by
  ``bucket`` for the checked edges (pairs near the threshold get an exact check: texts joined
  to pair ends by ``key``, ends paired by ``(a, b)``), then large-star / small-star rounds,
  each a reduce by ``a``, until the edge checksum is stable.
No task ever holds every edge or every document.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.dedup.components import (
    both_directions,
    checksum,
    labels_from_stars,
    large_star,
    small_star,
)
from crucible.data_pipeline.dedup.exact import exact_duplicates
from crucible.data_pipeline.dedup.lsh import bucket_edges, explode_bands
from crucible.data_pipeline.dedup.results import with_part
from crucible.data_pipeline.dedup.verify import (
    attach_text,
    doc_rows,
    exact_edges,
    pair_ends,
    unique_pairs,
)
from crucible.data_pipeline.spec import DataSpec, MinHashSpec
from crucible.data_pipeline.stages import filter_part, finalize_part
from crucible.errors import CrucibleError

PARTITION_BYTES = 64 << 20
"""Default bytes of shuffled data per task: every groupby's partition count is its data size
over this, and shuffle map inputs and blocks are a fixed share of it, so a task's memory stays
the same as the corpus grows."""

BLOCK_FRACTION = 8
"""Blocks, read batches and shuffle map inputs are ``partition_bytes / BLOCK_FRACTION``: a
SHUFFLE_V2 map task holds about five times its input at its peak (see
:meth:`RayExecutor._bounded`), so its input must be a small share of a task's budget."""

_EDGE_BYTES = 16  # an {a, b} int64 edge row
_LABEL_BYTES = 16  # a {key, root} int64 row


def _band_row_bytes(mh: MinHashSpec) -> int:
    """Bytes of one exploded band row: bucket, key and the document's uint32 signature."""
    return 8 + 8 + 4 * mh.num_perm


def _select(batch: dict[str, np.ndarray], col: str, value: bool = True) -> dict[str, np.ndarray]:
    """The ``{a, b}`` edges of a batch whose flag ``col`` equals ``value``."""
    keep = np.asarray(batch[col], bool) == value
    return {"a": np.asarray(batch["a"])[keep], "b": np.asarray(batch["b"])[keep]}


def _num_rows(files: list[Location]) -> int:
    """Rows of the Parquet ``files``, from their footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f.open_read()).metadata.num_rows for f in files)


def _column_bytes(files: list[Location], columns: list[str]) -> int:
    """Uncompressed bytes of ``columns`` in the Parquet ``files``, from their footers (close to
    their size in memory, where the file size would understate compressed text several-fold)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        meta = pq.ParquetFile(f.open_read()).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in columns:
                    total += col.total_uncompressed_size
    return total


def _read_batches(
    batch: dict[str, np.ndarray], columns: list[str], batch_bytes: int
) -> Iterator[dict[str, np.ndarray]]:
    """Stream ``columns`` of each Parquet file named in ``batch["path"]`` in bounded batches."""
    import pyarrow.parquet as pq

    for path in batch["path"]:
        loc = location(str(path))
        f = pq.ParquetFile(loc.open_read())
        meta = f.metadata
        nbytes = _column_bytes([loc], columns)
        rows = max(int(meta.num_rows * batch_bytes // max(nbytes, 1)), 1)
        for rb in f.iter_batches(batch_size=rows, columns=columns):
            yield {c: _column_numpy(rb.column(c)) for c in columns}


def _column_numpy(col: Any) -> np.ndarray:
    """An Arrow column as numpy: lists as a 2-D array (fixed length here), else values."""
    import pyarrow as pa

    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


def _release_memory() -> None:
    """Hand memory freed by a finished task back to the OS: Arrow's pool keeps freed blocks
    for reuse, and glibc's malloc keeps the top of its heaps, so a long-lived worker's
    footprint would be its largest task's, not its current one's."""
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError):  # a libc without it (musl)
            ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc is loaded


def _releasing(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """``fn``, followed by :func:`_release_memory`."""

    @functools.wraps(fn)
    def run(row: dict) -> dict:
        try:
            return fn(row)
        finally:
            _release_memory()

    return run


def _ensure_ray() -> Any:
    import ray

    if not ray.is_initialized():
        # inside a Ray job RAY_ADDRESS names the cluster; otherwise start a private local one
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=False)
    try:  # the cluster's scrape-target registry, for the driver's metrics (this is the head)
        from crucible.monitoring.discovery import ensure_registry

        ensure_registry()
    except Exception as e:  # metrics never stop a job
        print(f"warning: metrics discovery unavailable ({type(e).__name__}: {e})", flush=True)
    return ray


def _write_partitioned(ds: Any, out: Location) -> None:
    """``ds`` (with ``key``) as Parquet partitioned by part into the new directory ``out``."""
    out.mkdirs()
    ds = ds.map_batches(with_part, batch_format="numpy")
    if ds.count():
        ds.write_parquet(out.path, filesystem=out.fs, partition_cols=["part"])


class RayExecutor:
    """Runs the pipeline's stages on Ray Data."""

    name = "ray"

    def __init__(
        self, num_workers: int | None = None, partition_bytes: int = PARTITION_BYTES
    ) -> None:
        """Connect to (or start) Ray.

        Args:
            num_workers: concurrent per-part tasks (None: one per CPU).
            partition_bytes: bytes of shuffled data per task (see :data:`PARTITION_BYTES`).
        """
        if partition_bytes < 4096:
            raise CrucibleError(
                f"partition_bytes is {partition_bytes}: use at least 4096 (64 MiB is the default)"
            )
        self.ray = _ensure_ray()
        self.num_workers = num_workers
        self.partition_bytes = partition_bytes
        # at least one shuffle partition per CPU, more as the data grows (see _partitions)
        self.partitions = max(int(self.ray.cluster_resources().get("CPU", 1)), 1)

    def _partitions(self, nbytes: int) -> int:
        """Shuffle partitions for ``nbytes`` of data: each holds at most ``partition_bytes``."""
        return max(self.partitions, -(-int(nbytes) // self.partition_bytes))

    @property
    def block_bytes(self) -> int:
        """Bytes per block, read batch and shuffle map batch (see :data:`BLOCK_FRACTION`)."""
        return max(self.partition_bytes // BLOCK_FRACTION, 1)

    def _bounded(self, ds: Any) -> Any:
        """``ds`` with blocks and shuffle map inputs capped at :attr:`block_bytes`.

        Ray Data's SHUFFLE_V2 map task (``_shuffle_map_task``, 2.60) takes input blocks until
        they reach ``shuffle_input_batch_bytes`` (1 GiB by default), so its input is up to that
        plus one block; it then holds the inputs (mapped from the object store), a copy with
        chunks combined, a copy sorted by partition and every partition's encoded shard until
        it returns, about five times its input. With both at ``partition_bytes`` the input
        ranged from one block to two, whichever the corpus size happened to give. Datasets
        derived from ``ds`` copy its context, so setting it on each source covers every stage
        after it.
        """
        ctx = ds.context
        ctx.shuffle_input_batch_bytes = self.block_bytes
        ctx.target_max_block_size = self.block_bytes
        return ds

    @staticmethod
    def _reduce(ds: Any, keys: list[str], parts: int, fn: Callable[[dict], dict]) -> Any:
        """``fn`` on each of ``parts`` hash partitions of ``ds`` by ``keys``, one call each.

        ``groupby(keys).map_groups(fn)`` (2.60) sorts each partition, then calls ``fn`` once
        per group: the bucket shuffle has about one group per row, so a reduce task made a
        Python call and an output table per row. Every reduce function here takes any batch
        of complete groups and orders it itself, and a keyed ``repartition`` emits each
        partition as one block (its reduce never splits blocks), so one call per block is the
        same result.
        """
        part = ds.repartition(parts, keys=keys)
        return part.map_batches(fn, batch_size=None, batch_format="numpy")

    def _read(self, files: list[Location], columns: list[str]) -> Any:
        """``columns`` of the Parquet ``files``: one task per file, streamed in row batches.

        ``ray.data.read_parquet`` (2.60) lists the files and reads them all in one task, which
        then grows with the corpus; here each file is its own task and yields batches of
        about :attr:`block_bytes`.
        """
        import ray.data

        rows = ray.data.from_items(
            [{"path": f.uri} for f in files], override_num_blocks=max(len(files), 1)
        )
        read = functools.partial(_read_batches, columns=columns, batch_bytes=self.block_bytes)
        return self._bounded(rows.map_batches(read, batch_size=1, batch_format="numpy"))

    def _per_part(self, items: list[dict[str, Any]], fn: Callable[[dict], dict]) -> Any:
        """``fn`` on each item, one task each, in worker processes kept for per-part tasks.

        Ray reuses a worker process for any task with the same runtime environment, and a
        process keeps the heap its earlier tasks grew (a shuffle reduce's, say). Per-part
        tasks are the same size whatever the corpus, so they get their own pool (a distinct
        environment variable, as Ray Data does for its shuffle map tasks) and their memory
        stays that of one part.
        """
        import ray.data

        ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
        env = {"env_vars": {"CRUCIBLE_WORKER_POOL": "per-part"}}
        return ds.map(_releasing(fn), num_cpus=1, concurrency=self.num_workers, runtime_env=env)

    def filter_parts(
        self,
        items: list[tuple[int, str]],
        spec: DataSpec,
        run_dir: Location,
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Filter each ``(part, path)`` in a Ray Data task; ``on_done`` as each finishes."""
        if not items:
            return
        blob = spec.model_dump_json()

        def filter_part_task(row: dict[str, Any]) -> dict[str, Any]:
            import json

            s = DataSpec.model_validate_json(blob)
            stats = filter_part(int(row["part"]), row["path"], s, location(row["run_dir"]))
            return {"part": row["part"], "stats": json.dumps(stats)}

        rows = [{"part": p, "path": path, "run_dir": run_dir.uri} for p, path in items]
        self._drain(self._per_part(rows, filter_part_task), on_done)

    @staticmethod
    def _drain(ds: Any, on_done: Callable[[int, dict[str, Any]], None]) -> None:
        import json

        for row in ds.iter_rows():
            on_done(int(row["part"]), json.loads(row["stats"]))

    def map(self, fn: Callable[[dict], dict], items: list[dict]) -> list[dict]:
        """``fn`` on each item, one Ray task each (per-part pool); results in item order."""
        if not items:
            return []
        keys = list(items[0])  # the closure carries the key names only, not an item's payload

        def task(row: dict[str, Any]) -> dict[str, Any]:
            return {"seq": row["seq"], **fn({k: row[k] for k in keys})}

        rows = self._per_part([{"seq": i, **item} for i, item in enumerate(items)], task)
        out = sorted(rows.take_all(), key=lambda r: r["seq"])
        return [{k: v for k, v in r.items() if k != "seq"} for r in out]

    def map_reduce(
        self,
        items: list[dict],
        map_fn: Callable[[dict], Any],
        key: str,
        reduce_fn: Callable[[Any], Any],
        partitions: int,
    ) -> list[dict]:
        """Rows from ``map_fn`` of each item (a task each), hash-partitioned by ``key`` into
        ``partitions`` groups of whole keys, each reduced by one ``reduce_fn`` call; its
        result rows (Arrow tables on both sides).

        Args:
            items: inputs of the map side.
            map_fn: item -> a ``pyarrow.Table`` of rows, ``key`` among their columns.
            key: the grouping column.
            reduce_fn: a table of whole groups -> a table of result rows.
            partitions: reduce tasks (each holds about 1/partitions of the rows).
        """
        import ray.data

        if not items:
            return []

        def mapper(batch: Any) -> Any:
            (item,) = batch.to_pylist()
            return map_fn(item)

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        rows = self._bounded(ds).map_batches(mapper, batch_size=1, batch_format="pyarrow")
        part = rows.repartition(max(int(partitions), 1), keys=[key])
        out = part.map_batches(reduce_fn, batch_size=None, batch_format="pyarrow")
        return out.take_all()

    def exact_dedup(self, files: list[Location], out_dir: Location) -> dict[str, Any]:
        """Global exact dedup with a hash-partitioned groupby on the text hash."""
        ds = self._read(files, ["key", "text_hash"])
        parts = self._partitions(_column_bytes(files, ["key", "text_hash"]))
        dups = self._reduce(ds, ["text_hash"], parts, exact_duplicates).materialize()
        _write_partitioned(dups, out_dir)
        return {"duplicates": int(dups.count())}

    def _band_rows(self, files: list[Location], mh: MinHashSpec) -> Any:
        """One ``{bucket, key, signature}`` row per (document, band) of ``files``, in blocks of
        about :attr:`block_bytes`."""
        ds = self._read(files, ["key", "bands", "signature"])
        # exploding multiplies a batch num_bands-fold: batches sized so that the output of one
        # is a block (a whole read block grew with the files per task)
        docs_per_batch = max(self.block_bytes // (mh.num_bands * _band_row_bytes(mh)), 1)
        return ds.map_batches(explode_bands, batch_format="numpy", batch_size=docs_per_batch)

    def fuzzy_dedup(
        self, files: list[Location], out_dir: Location, spec: DataSpec
    ) -> dict[str, Any]:
        """LSH buckets -> star edges -> large-star/small-star rounds -> ``{key, root}``."""
        mh = spec.dedup.minhash
        rows = self._band_rows(files, mh)
        parts = self._partitions(_num_rows(files) * mh.num_bands * _band_row_bytes(mh))
        check = functools.partial(bucket_edges, threshold=mh.threshold, margin=mh.margin)
        checked = self._reduce(rows, ["bucket"], parts, check).materialize()
        edges = checked.map_batches(functools.partial(_select, col="sure"), batch_format="numpy")
        unsure = (
            checked.map_batches(
                functools.partial(_select, col="sure", value=False), batch_format="numpy"
            )
            .map_batches(unique_pairs, batch_format="numpy")
            .materialize()
        )
        n_unsure = unsure.count()
        n_exact = 0
        if n_unsure:
            exact = self._exact_check(files, unsure, mh.n_grams, mh.threshold).materialize()
            n_unsure = exact.count()  # distinct pairs (unsure repeats them across buckets)
            kept = exact.map_batches(functools.partial(_select, col="kept"), batch_format="numpy")
            kept = kept.materialize()
            n_exact = kept.count()
            edges = edges.union(kept)
        edges = edges.materialize()
        n_edges = edges.count()
        cur, prev, rounds = edges, None, 0
        if n_edges:
            for rnd in range(1, spec.dedup.minhash.max_rounds + 1):
                rounds = rnd
                # both directions double the edges; a round never outgrows its input's size
                parts = self._partitions(2 * _EDGE_BYTES * cur.count())
                cur = cur.map_batches(both_directions, batch_format="numpy")
                cur = self._reduce(cur, ["a"], parts, large_star)
                cur = self._reduce(cur, ["a"], parts, small_star).materialize()
                sums = cur.map_batches(checksum, batch_format="numpy").take_all()
                key = (
                    sum(int(r["n"]) for r in sums),
                    int(np.array([r["h"] for r in sums], dtype=np.uint64).sum(dtype=np.uint64)),
                )
                if key == prev:
                    break
                prev = key
            else:
                raise RuntimeError("connected components did not converge")
        labels = cur.map_batches(labels_from_stars, batch_format="numpy") if n_edges else None
        hist: dict[str, int] = {}
        n_dups = 0
        if labels is not None:
            labels = labels.materialize()
            n_dups = labels.count()
            # cluster sizes, then how many clusters of each size: only the histogram is collected
            parts = self._partitions(_LABEL_BYTES * n_dups)
            sizes = labels.groupby("root", num_partitions=parts).count()
            sizes = sizes.rename_columns({"count()": "members"})
            counts = sizes.groupby("members", num_partitions=self.partitions).count().take_all()
            hist = {str(int(r["members"]) + 1): int(r["count()"]) for r in counts}
            hist = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
            _write_partitioned(labels.select_columns(["key", "root"]), out_dir)
        else:
            out_dir.mkdirs()
        return {
            "edges": int(n_edges),
            "exact_checked": int(n_unsure),
            "exact_kept": int(n_exact),
            "rounds": rounds,
            "duplicates": n_dups,
            "cluster_sizes": hist,
        }

    def _exact_check(
        self, files: list[Location], pairs: Any, n_grams: int, threshold: float
    ) -> Any:
        """Exact Jaccard of ``pairs``: texts joined to pair ends by key, ends paired by pair."""
        docs = self._read(files, ["key", "text"])
        ends = pairs.map_batches(pair_ends, batch_format="numpy")
        rows = ends.union(docs.map_batches(doc_rows, batch_format="numpy"))
        # texts dominate both shuffles (each pair end carries one text after attach_text)
        parts = self._partitions(_column_bytes(files, ["key", "text"]))
        with_text = self._reduce(rows, ["key"], parts, attach_text)
        check = functools.partial(exact_edges, n_grams=n_grams, threshold=threshold)
        return self._reduce(with_text, ["a", "b"], parts, check)

    def finalize_parts(
        self,
        parts: list[int],
        spec: DataSpec,
        run_dir: Location,
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Write each part's documents and exclusions in a Ray Data task."""
        if not parts:
            return
        blob = spec.model_dump_json()

        def finalize_part_task(row: dict[str, Any]) -> dict[str, Any]:
            import json

            s = DataSpec.model_validate_json(blob)
            stats = finalize_part(int(row["part"]), s, location(row["run_dir"]))
            return {"part": row["part"], "stats": json.dumps(stats)}

        rows = [{"part": p, "run_dir": run_dir.uri} for p in parts]
        self._drain(self._per_part(rows, finalize_part_task), on_done)
