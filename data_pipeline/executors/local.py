"""In-process executor: every primitive in this process, in order (unit tests, debugging,
laptops).

A dataset is a list of batches held in memory; a shuffle hands all of its rows to one call of
the reduce function (the reduce functions take any batch of complete groups, so one group of
everything is the same result as the Ray executor's partitions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible.cluster.storage import Location
from crucible.data_pipeline.batches import table_numpy
from crucible.data_pipeline.executors.base import Batch, BatchFormat, Executor
from crucible.data_pipeline.writers.by_part import write_partitioned_local

LocalData = list[Batch]


def _rows(batch: Batch) -> int:
    if isinstance(batch, pa.Table):
        return batch.num_rows
    return len(next(iter(batch.values()))) if batch else 0


def _as_format(batch: Batch, fmt: BatchFormat) -> Batch:
    if fmt == "pyarrow":
        return batch if isinstance(batch, pa.Table) else pa.table(batch)
    return table_numpy(batch) if isinstance(batch, pa.Table) else batch


def _concat(batches: LocalData, fmt: BatchFormat) -> Batch:
    """The non-empty ``batches`` as one batch (an empty one when all are empty)."""
    full = [_as_format(b, fmt) for b in batches if _rows(b)] or [_as_format(batches[0], fmt)]
    if fmt == "pyarrow":
        return pa.concat_tables(full)
    if len(full) == 1:
        return full[0]
    return {c: np.concatenate([b[c] for b in full]) for c in full[0]}


class LocalExecutor(Executor):
    """Runs every stage's primitives in this process."""

    name = "local"

    def run_tasks(
        self, items: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``fn`` on each item, in order."""
        for i, item in enumerate(items):
            yield i, fn(item)

    def read_parquet(self, files: Sequence[Location], columns: list[str]) -> LocalData:
        """One batch per file."""
        return [table_numpy(pq.read_table(f.open_read(), columns=columns)) for f in files]

    def from_tasks(
        self, items: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], Batch]
    ) -> LocalData:
        """``fn``'s batch of each item."""
        return [fn(item) for item in items]

    def from_batch(self, batch: dict[str, Any]) -> LocalData:
        """The batch itself."""
        return [batch]

    def map_batches(
        self,
        ds: LocalData,
        fn: Callable[[Batch], Batch],
        batch_format: BatchFormat = "numpy",
        out_row_bytes: int | None = None,
    ) -> LocalData:
        """``fn`` on each batch."""
        return [fn(_as_format(b, batch_format)) for b in ds]

    def shuffle(
        self,
        ds: LocalData,
        keys: list[str],
        fn: Callable[[Batch], Batch],
        nbytes: int = 0,
        partitions: int | None = None,
        batch_format: BatchFormat = "numpy",
    ) -> LocalData:
        """``fn`` once, on every row (one partition holds every group)."""
        if not any(_rows(b) for b in ds):
            return []
        return [fn(_concat(ds, batch_format))]

    def union(self, a: LocalData, b: LocalData) -> LocalData:
        """Both lists of batches."""
        return [*a, *b]

    def materialize(self, ds: LocalData) -> LocalData:
        """Already in memory."""
        return ds

    def count(self, ds: LocalData) -> int:
        """Rows of every batch."""
        return sum(_rows(b) for b in ds)

    def take_all(self, ds: LocalData) -> list[dict[str, Any]]:
        """Every row as a dict."""
        return [row for b in ds for row in _as_format(b, "pyarrow").to_pylist()]

    def write_by_part(self, ds: LocalData, out: Location) -> None:
        """Every row, sorted by key, one file per part."""
        rows = [b for b in ds if _rows(b)]
        if not rows:
            out.mkdirs()
            return
        write_partitioned_local(_concat(rows, "numpy"), out)
