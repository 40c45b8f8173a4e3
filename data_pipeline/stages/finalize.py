"""The finalise stage: each part's survivors (its duplicates dropped) written as the clean
documents, and its exclusions (the filter's drops, then the duplicates), one task per part.

Before the tasks start, the metadata fields of every part (counted by the reader, read back
from the filter markers) are unified into one struct type, so every part's documents have the
same schema (:mod:`crucible.data_pipeline.writers.metadata`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.decontam.apply import part_contamination
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.executors.base import Executor, Stage
from crucible.data_pipeline.run_dir import marker_name, part_name, read_marker, work_paths
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages.parts import PartStage
from crucible.data_pipeline.writers.metadata import (
    kinds_from_counters,
    metadata_column,
    metadata_type,
    unify_kinds,
)
from crucible.data_pipeline.writers.parquet import (
    DOCUMENT_SCHEMA,
    EXCLUSION_SCHEMA,
    FILTERED_SCHEMA,
    AtomicParquetWriter,
    document_schema,
)

EXACT_RULE = "exact_dedup/duplicate"
FUZZY_RULE = "minhash_dedup/duplicate"


def _dup_keys(marker: Location, part: int, column: str) -> pa.Table | None:
    """Rows of a dedup result (hive-partitioned by ``part``) that belong to part ``part``.

    Args:
        marker: the dedup stage's marker, naming the committed result directory.
        part: the part.
        column: the column besides ``key`` to read.
    """
    done = read_marker(marker)
    if done is None or not done.get("result"):
        return None
    sub = marker.parent / done["result"] / f"part={part}"
    files = sub.glob("*.parquet")
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f.open_read(), columns=["key", column]) for f in files])


def metadata_fields(run_dir: Location, num_parts: int) -> dict[str, str]:
    """``{field: kind}`` of the metadata of every filtered part, unified (one kind each).

    Args:
        run_dir: the run directory (its filter markers hold the reader's counts).
        num_parts: the number of parts.
    """
    p = work_paths(run_dir)
    kinds: dict[str, set[str]] = {}
    for part in range(num_parts):
        done = read_marker(p["filter_done"] / marker_name(part)) or {}
        counters = done.get("read", {}).get("counters", {})
        for field, ks in kinds_from_counters(counters).items():
            kinds.setdefault(field, set()).update(ks)
    return unify_kinds(kinds)


def finalize_part(
    part: int, spec: DataSpec, run_dir: Location, fields: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write part ``part``'s clean documents and exclusions (filter drops + duplicates).

    Args:
        part: the part index.
        spec: the data spec.
        run_dir: the run directory.
        fields: ``{field: kind}`` of the metadata of all parts (:func:`metadata_fields`);
            None or empty writes no metadata column.
    """
    p = work_paths(run_dir)
    name = part_name(part)
    fields = fields or {}
    # the dedup columns (bands, signature) are not needed here: read only what is written
    table = pq.read_table(
        (p["filtered"] / name).open_read(),
        columns=[*DOCUMENT_SCHEMA.names, "key", *(["metadata"] if fields else [])],
        schema=FILTERED_SCHEMA,
    )
    keys = table.column("key").to_numpy()
    nbytes = np.asarray(pc.binary_length(pc.cast(table.column("text"), pa.binary())), np.int64)
    exact = _dup_keys(p["dedup"] / "exact.json", part, "dup_of")
    fuzzy = _dup_keys(p["dedup"] / "minhash.json", part, "root")
    is_exact = np.isin(keys, exact.column("key").to_numpy()) if exact is not None else None
    is_fuzzy = np.isin(keys, fuzzy.column("key").to_numpy()) if fuzzy is not None else None
    if is_exact is None:
        is_exact = np.zeros(keys.size, dtype=bool)
    if is_fuzzy is None:
        is_fuzzy = np.zeros(keys.size, dtype=bool)
    is_fuzzy &= ~is_exact
    keep = ~(is_exact | is_fuzzy)
    decontam = part_contamination(spec, p["dedup"] / "decontaminate.json", part, table, keep)

    stats: dict[str, Any] = {}
    for step, drop, alive in (
        ("exact_dedup", is_exact, np.ones(keys.size, bool)),
        ("minhash_dedup", is_fuzzy, ~is_exact),
    ):
        s = StepStats()
        s.docs_in, s.bytes_in = int(alive.sum()), int(nbytes[alive].sum())
        s.docs_out, s.bytes_out = int((alive & ~drop).sum()), int(nbytes[alive & ~drop].sum())
        if drop.any():
            s.dropped["duplicate"] = int(drop.sum())
        stats[step] = s.to_dict()
    if decontam is not None:  # counted among the survivors of dedup, dropped unless marking
        stats.update(decontam.stats)
        keep &= ~decontam.drop

    schema = document_schema(metadata_type(fields))
    docs = AtomicParquetWriter(p["documents"] / name, schema)
    kept = table.filter(pa.array(keep))
    out = kept.select(DOCUMENT_SCHEMA.names)
    if fields:
        meta = metadata_column(kept.column("metadata").to_pylist(), fields)
        out = out.append_column(schema.field("metadata"), meta)
    docs.write(out)
    excl = AtomicParquetWriter(p["exclusions"] / name, EXCLUSION_SCHEMA)
    excl.write(pq.read_table((p["excluded"] / name).open_read(), schema=EXCLUSION_SCHEMA))
    for mask, rule in ((is_exact, EXACT_RULE), (is_fuzzy, FUZZY_RULE)):
        if mask.any():
            dropped = table.filter(pa.array(mask))
            text = dropped.column("text") if spec.output.exclusion_text else None
            if text is not None:
                text = pc.utf8_slice_codeunits(text, 0, spec.output.max_exclusion_text_chars)
            excl.write(
                pa.table(
                    {
                        "id": dropped.column("id"),
                        "source": dropped.column("source"),
                        "rule": pa.array([rule] * dropped.num_rows, pa.string()),
                        "text": text
                        if text is not None
                        else pa.nulls(dropped.num_rows, pa.string()),
                    },
                    schema=EXCLUSION_SCHEMA,
                )
            )
    if decontam is not None:
        excl.write(decontam.exclusions)
        decontam.write_audit(run_dir / "decontamination" / name)
    docs.commit()
    excl.commit()
    (p["final_done"] / marker_name(part)).write_json(stats)
    return stats


def finalize_task(
    item: dict[str, Any], spec_json: str, run_dir: str, fields: dict[str, str]
) -> dict[str, Any]:
    """:func:`finalize_part` as a task: ``item`` holds ``part``."""
    spec = DataSpec.model_validate_json(spec_json)
    return finalize_part(int(item["part"]), spec, location(run_dir), fields)


class FinalizeStage(Stage):
    """The metadata type of all parts, then :func:`finalize_part` on every unfinished part."""

    name = "finalize"

    def __init__(self, spec: DataSpec, run_dir: Location, num_parts: int) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.num_parts = num_parts

    def run(self, ex: Executor) -> dict[str, Any]:
        """Finalise the parts whose marker is missing; every part's statistics, summed."""
        task = functools.partial(
            finalize_task,
            spec_json=self.spec.model_dump_json(),
            run_dir=self.run_dir.uri,
            fields=metadata_fields(self.run_dir, self.num_parts),
        )
        items = [{"part": i} for i in range(self.num_parts)]
        marker_dir = work_paths(self.run_dir)["final_done"]
        return PartStage(self.name, items, task, marker_dir).run(ex)


def finalize_stage(spec: DataSpec, run_dir: Location, num_parts: int) -> FinalizeStage:
    """The finalise stage over parts ``0 .. num_parts - 1``."""
    return FinalizeStage(spec, run_dir, num_parts)
