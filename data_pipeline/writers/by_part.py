"""Rows keyed by document written as Parquet partitioned by input part (``part=<p>/``), so a
per-part task reads only its own rows (the dedup results; each attempt writes a fresh
directory, committed by the stage's marker naming it, see
:mod:`crucible.data_pipeline.stages.dedup`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crucible.cluster.storage import Location
from crucible.data_pipeline.document import ROW_BITS


def with_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the ``part`` column (the input part each key came from)."""
    out = dict(batch)
    out["part"] = (np.asarray(batch["key"], np.int64) >> ROW_BITS).astype(np.int64)
    return out


def write_partitioned_local(table: dict[str, np.ndarray], out: Location) -> None:
    """Write ``table`` (with ``key``) partitioned by part into the new directory ``out``."""
    t = pa.table(with_part(table))
    out.mkdirs()
    if t.num_rows:
        t = t.sort_by("key")
        pq.write_to_dataset(
            t,
            out.path,
            filesystem=out.fs,
            partition_cols=["part"],
            basename_template="data-{i}.parquet",
        )
