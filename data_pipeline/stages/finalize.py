"""The finalise stage: each part's survivors (its duplicates dropped) written as the clean
documents, and its exclusions (the filter's drops, then the duplicates), one task per part."""

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
from crucible.data_pipeline.run_dir import marker_name, part_name, read_marker, work_paths
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages.parts import PartStage
from crucible.data_pipeline.writers.parquet import (
    DOCUMENT_SCHEMA,
    EXCLUSION_SCHEMA,
    FILTERED_SCHEMA,
    AtomicParquetWriter,
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


def finalize_part(part: int, spec: DataSpec, run_dir: Location) -> dict[str, Any]:
    """Write part ``part``'s clean documents and exclusions (filter drops + duplicates).

    Args:
        part: the part index.
        spec: the data spec.
        run_dir: the run directory.
    """
    p = work_paths(run_dir)
    name = part_name(part)
    # the dedup columns (bands, signature) are not needed here: read only what is written
    table = pq.read_table(
        (p["filtered"] / name).open_read(),
        columns=[*DOCUMENT_SCHEMA.names, "key"],
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

    docs = AtomicParquetWriter(p["documents"] / name, DOCUMENT_SCHEMA)
    docs.write(table.filter(pa.array(keep)).select(DOCUMENT_SCHEMA.names))
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


def finalize_task(item: dict[str, Any], spec_json: str, run_dir: str) -> dict[str, Any]:
    """:func:`finalize_part` as a task: ``item`` holds ``part``."""
    spec = DataSpec.model_validate_json(spec_json)
    return finalize_part(int(item["part"]), spec, location(run_dir))


def finalize_stage(spec: DataSpec, run_dir: Location, num_parts: int) -> PartStage:
    """The finalise stage over parts ``0 .. num_parts - 1``."""
    task = functools.partial(finalize_task, spec_json=spec.model_dump_json(), run_dir=run_dir.uri)
    items = [{"part": i} for i in range(num_parts)]
    return PartStage("finalize", items, task, work_paths(run_dir)["final_done"])
