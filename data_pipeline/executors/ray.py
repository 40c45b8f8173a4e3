"""Ray Data executor: the executor contract (:mod:`.base`) on Ray Data, with bounded memory
per task.

- tasks: one Ray Data task per item, in worker processes kept for them (see
  :meth:`RayExecutor.run_tasks`), streamed as they finish;
- Parquet columns: one task per file, read in batches of :attr:`RayExecutor.block_bytes`;
- shuffles: a keyed ``repartition`` (hash-partitioned) and one reduce call per partition, the
  partition count set by the data's size (:data:`PARTITION_BYTES` each).
No task ever holds every edge or every document.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from crucible.cluster.storage import Location
from crucible.data_pipeline.batches import iter_column_batches
from crucible.data_pipeline.executors.base import Batch, BatchFormat, Dataset, Executor
from crucible.data_pipeline.writers.by_part import with_part
from crucible.errors import CrucibleError

PARTITION_BYTES = 64 << 20
"""Default bytes of shuffled data per task: every shuffle's partition count is its data size
over this, and shuffle map inputs and blocks are a fixed share of it, so a task's memory stays
the same as the corpus grows."""

BLOCK_FRACTION = 8
"""Blocks, read batches and shuffle map inputs are ``partition_bytes / BLOCK_FRACTION``: a
SHUFFLE_V2 map task holds about five times its input at its peak (see
:meth:`RayExecutor._bounded`), so its input must be a small share of a task's budget."""


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


def _task(row: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict:
    """One task of :meth:`RayExecutor.run_tasks`: items and results travel as JSON (a row's
    values would otherwise become Arrow types, nested dicts structs)."""
    _release_memory()  # what an earlier task in this worker (a shuffle's reduce) left
    try:
        return {"seq": row["seq"], "result": json.dumps(fn(json.loads(row["item"])))}
    finally:
        _release_memory()


def _one_item(batch: Any, fn: Callable[[dict[str, Any]], Batch]) -> Batch:
    """The map side of :meth:`RayExecutor.from_tasks`: ``fn`` of a batch's single item."""
    (row,) = batch.to_pylist()
    return fn(json.loads(row["item"]))


def _read_files(
    batch: dict[str, Any], columns: list[str], batch_bytes: int
) -> Iterator[dict[str, Any]]:
    """``columns`` of each Parquet file named in ``batch["path"]``, in bounded batches."""
    for path in batch["path"]:
        yield from iter_column_batches(str(path), columns, batch_bytes)


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


def quiet_third_party(verbose: bool = False) -> None:
    """Ray Data's INFO logs and progress bars off (they would bury the stages' own lines),
    unless ``verbose``. Only Ray Data's public switches: its ``DataContext`` and the
    ``ray.data`` logger."""
    if verbose:
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RayExecutor(Executor):
    """Runs every stage's primitives on Ray Data."""

    name = "ray"

    def __init__(
        self, num_workers: int | None = None, partition_bytes: int = PARTITION_BYTES
    ) -> None:
        """Connect to (or start) Ray.

        Args:
            num_workers: concurrent tasks of :meth:`run_tasks` (None: one per CPU).
            partition_bytes: bytes of shuffled data per task (see :data:`PARTITION_BYTES`).
        """
        if partition_bytes < 4096:
            raise CrucibleError(
                f"partition_bytes is {partition_bytes}: use at least 4096 (64 MiB is the default)"
            )
        self.ray = _ensure_ray()
        self.num_workers = num_workers
        self.partition_bytes = partition_bytes
        # a shuffle larger than one partition has one per CPU at least (see _partitions)
        self.partitions = max(int(self.ray.cluster_resources().get("CPU", 1)), 1)

    def _partitions(self, nbytes: int) -> int:
        """Shuffle partitions for ``nbytes`` of data: each holds at most ``partition_bytes``;
        data that fits in one is one, more is spread over every CPU at least."""
        if nbytes <= self.partition_bytes:
            return 1
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

    def run_tasks(
        self, items: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``fn`` on each item, one task each, streamed as they finish.

        A worker process keeps the heap its earlier tasks grew (a shuffle reduce's, say): each
        task hands it back to the OS before and after its item (:func:`_release_memory`), so
        these tasks, the same size whatever the corpus (one part, one file), run in Ray Data's
        own workers at the memory of one item. (A worker pool of their own, a distinct
        runtime environment, cost a fresh set of worker processes at each such stage: seconds
        of start-up and imports, the Ray path's largest fixed cost on small corpora.)
        """
        import ray.data

        if not items:
            return
        rows = [{"seq": i, "item": json.dumps(item)} for i, item in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        task = functools.partial(_task, fn=fn)
        pool = ray.data.TaskPoolStrategy(size=self.num_workers)
        out = ds.map(task, num_cpus=1, compute=pool)
        for row in out.iter_rows():
            yield int(row["seq"]), json.loads(row["result"])

    def read_parquet(self, files: Sequence[Location], columns: list[str]) -> Any:
        """``columns`` of the Parquet ``files``: one task per file, streamed in row batches.

        ``ray.data.read_parquet`` (2.60) lists the files and reads them all in one task, which
        then grows with the corpus; here each file is its own task and yields batches of
        about :attr:`block_bytes`.
        """
        import ray.data

        rows = ray.data.from_items(
            [{"path": f.uri} for f in files], override_num_blocks=max(len(files), 1)
        )
        read = functools.partial(_read_files, columns=columns, batch_bytes=self.block_bytes)
        return self._bounded(rows.map_batches(read, batch_size=1, batch_format="numpy"))

    def from_tasks(
        self, items: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], Batch]
    ) -> Any:
        """``fn`` on each item (a task each), its Arrow batch a block."""
        import ray.data

        rows = [{"item": json.dumps(item)} for item in items]
        ds = ray.data.from_items(rows, override_num_blocks=max(len(rows), 1))
        mapper = functools.partial(_one_item, fn=fn)
        return self._bounded(ds).map_batches(mapper, batch_size=1, batch_format="pyarrow")

    def from_batch(self, batch: dict[str, Any]) -> Any:
        """One numpy batch as a dataset."""
        import pyarrow as pa
        import ray.data

        return self._bounded(ray.data.from_arrow(pa.table(batch)))

    def map_batches(
        self,
        ds: Dataset,
        fn: Callable[[Batch], Batch],
        batch_format: BatchFormat = "numpy",
        out_row_bytes: int | None = None,
    ) -> Any:
        """``fn`` on every batch; with ``out_row_bytes``, input batches sized so that the
        output of one is about a block (a whole read block would grow with the files)."""
        if out_row_bytes is None:
            return ds.map_batches(fn, batch_format=batch_format)
        rows = max(self.block_bytes // max(out_row_bytes, 1), 1)
        return ds.map_batches(fn, batch_format=batch_format, batch_size=rows)

    def shuffle(
        self,
        ds: Dataset,
        keys: list[str],
        fn: Callable[[Batch], Batch],
        nbytes: int = 0,
        partitions: int | None = None,
        batch_format: BatchFormat = "numpy",
    ) -> Any:
        """``fn`` on each hash partition of ``ds`` by ``keys``, one call each.

        ``groupby(keys).map_groups(fn)`` (2.60) sorts each partition, then calls ``fn`` once
        per group: the bucket shuffle has about one group per row, so a reduce task made a
        Python call and an output table per row. Every reduce function takes any batch of
        complete groups and orders it itself, and a keyed ``repartition`` emits each
        partition as one block (its reduce never splits blocks), so one call per block is the
        same result.
        """
        parts = self._partitions(nbytes)
        if partitions is not None:
            parts = max(int(partitions), 1) if nbytes <= 0 else min(int(partitions), parts)
        # One partition is every row in one block: combining blocks needs no hash shuffle,
        # whose aggregator actors are started for each shuffle (seconds each, at any size).
        part = ds.repartition(1) if parts == 1 else ds.repartition(parts, keys=keys)
        return part.map_batches(fn, batch_size=None, batch_format=batch_format)

    def union(self, a: Dataset, b: Dataset) -> Any:
        """Rows of both."""
        return a.union(b)

    def materialize(self, ds: Dataset) -> Any:
        """Computed into the object store."""
        return ds.materialize()

    def count(self, ds: Dataset) -> int:
        """Rows of ``ds``."""
        return int(ds.count())

    def take_all(self, ds: Dataset) -> list[dict[str, Any]]:
        """Every row, on the driver."""
        return list(ds.take_all())

    def write_by_part(self, ds: Dataset, out: Location) -> None:
        """``ds`` as Parquet partitioned by part into the new directory ``out``."""
        out.mkdirs()
        if ds.count():  # free on a materialized dataset, where the mapped one would run
            ds = ds.map_batches(with_part, batch_format="numpy")
            ds.write_parquet(out.path, filesystem=out.fs, partition_cols=["part"])
