"""Batches: the pipeline's own Parquet columns as numpy batches, and their sizes from the
footers.

Both executors read intermediate files through these (list columns become 2-D arrays); the
sizes set shuffle partition counts without reading any data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible.cluster.storage import Location, location


def num_rows(files: Sequence[Location]) -> int:
    """Rows of the Parquet ``files``, from their footers."""
    return sum(pq.ParquetFile(f.open_read()).metadata.num_rows for f in files)


def column_bytes(files: Sequence[Location], columns: list[str]) -> int:
    """Uncompressed bytes of ``columns`` in the Parquet ``files``, from their footers (close to
    their size in memory, where the file size would understate compressed text several-fold)."""
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


def column_numpy(col: Any) -> np.ndarray:
    """An Arrow column as numpy: lists as a 2-D array (fixed length here), else values."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


def table_numpy(table: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """Every column of ``table`` as :func:`column_numpy`."""
    return {c: column_numpy(table.column(c)) for c in table.column_names}


def iter_column_batches(
    path: str, columns: list[str], batch_bytes: int
) -> Iterator[dict[str, np.ndarray]]:
    """``columns`` of the Parquet file ``path`` in numpy batches of about ``batch_bytes``."""
    loc = location(path)
    f = pq.ParquetFile(loc.open_read())
    nbytes = column_bytes([loc], columns)
    rows = max(int(f.metadata.num_rows * batch_bytes // max(nbytes, 1)), 1)
    for rb in f.iter_batches(batch_size=rows, columns=columns):
        yield {c: column_numpy(rb.column(c)) for c in columns}
