"""The finalise stage: each part's survivors (its duplicates dropped) written as the clean
documents, and its exclusions (the filter's drops, then the duplicates), one task per part.

Every duplicate's exclusion names the document it repeats (``duplicate_of``). The dedup
results name it by key, and a key's document may be in any part, so before the tasks start
the keys of the duplicates' survivors are joined with the documents' ids (a shuffle by key,
:func:`name_duplicates`), its result committed like a dedup result (``dedup/names.json``).

Before the tasks start, the metadata fields of every part (counted by the reader, read back
from the filter markers) are unified into one struct type, so every part's documents have the
same schema (:mod:`crucible.data_pipeline.writers.metadata`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.batches import column_bytes
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
# the dedup results joined with ids, in order: (stage, its survivor column)
DEDUPS = (("exact", "dup_of"), ("minhash", "root"))
NAMES = "names"
JOIN_SCHEMA = pa.schema(
    [("key", pa.int64()), ("dup", pa.int64()), ("kind", pa.int8()), ("id", pa.string())]
)
NAMES_SCHEMA = pa.schema([("key", pa.int64()), ("kind", pa.int8()), ("duplicate_of", pa.string())])


def _dup_keys(marker: Location, part: int, columns: Sequence[str]) -> pa.Table | None:
    """Rows of a dedup result (hive-partitioned by ``part``) that belong to part ``part``.

    Args:
        marker: the dedup stage's marker, naming the committed result directory.
        part: the part.
        columns: the columns to read.
    """
    done = read_marker(marker)
    if done is None or not done.get("result"):
        return None
    sub = marker.parent / done["result"] / f"part={part}"
    files = sub.glob("*.parquet")
    if not files:
        return None
    tables = [pq.read_table(f.open_read(), columns=list(columns)) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


def _result_files(dedup_dir: Location, result: str) -> list[Location]:
    return [f for d in (dedup_dir / result).glob("part=*") for f in d.glob("*.parquet")]


def survivor_rows(batch: pa.Table, kind: int, column: str) -> pa.Table:
    """Dedup result rows ``{key, <column>}`` as join rows keyed by the survivor's key."""
    n = batch.num_rows
    return pa.table(
        {
            "key": batch.column(column).cast(pa.int64()),
            "dup": batch.column("key").cast(pa.int64()),
            "kind": pa.array(np.full(n, kind, np.int8)),
            "id": pa.nulls(n, pa.string()),
        },
        schema=JOIN_SCHEMA,
    )


def document_rows(batch: pa.Table) -> pa.Table:
    """Filtered documents ``{key, id}`` as join rows (``dup`` -1: the document itself)."""
    n = batch.num_rows
    return pa.table(
        {
            "key": batch.column("key").cast(pa.int64()),
            "dup": pa.array(np.full(n, -1, np.int64)),
            "kind": pa.array(np.full(n, -1, np.int8)),
            "id": batch.column("id").cast(pa.string()),
        },
        schema=JOIN_SCHEMA,
    )


def attach_ids(batch: pa.Table) -> pa.Table:
    """``{key: duplicate, kind, duplicate_of: its survivor's id}`` from complete groups by key.

    Args:
        batch: join rows (:data:`JOIN_SCHEMA`): documents and survivor rows, in any order.
    """
    key = batch.column("key").to_numpy(zero_copy_only=False)
    dup = batch.column("dup").to_numpy(zero_copy_only=False)
    is_doc = dup < 0
    doc_keys = key[is_doc]
    doc_ids = batch.column("id").filter(pa.array(is_doc))
    order = np.argsort(doc_keys, kind="stable")
    rows = np.flatnonzero(~is_doc)
    pos = np.searchsorted(doc_keys[order], key[rows])
    found = pos < doc_keys.size
    found[found] &= doc_keys[order][pos[found]] == key[rows][found]
    take = np.where(found, order[np.minimum(pos, max(doc_keys.size - 1, 0))], 0)
    names = doc_ids.take(pa.array(take)) if doc_keys.size else pa.nulls(rows.size, pa.string())
    names = pc.if_else(pa.array(found), names, pa.scalar(None, pa.string()))
    return pa.table(
        {
            "key": pa.array(dup[rows], pa.int64()),
            "kind": batch.column("kind").take(pa.array(rows)),
            "duplicate_of": names,
        },
        schema=NAMES_SCHEMA,
    )


def name_duplicates(ex: Executor, run_dir: Location, num_parts: int) -> None:
    """Join every duplicate's survivor key with that document's id (a shuffle by key) and
    commit the ``{key, kind, duplicate_of}`` rows, by part, as ``dedup/names.json``'s result.

    A committed result made from the same dedup results is kept.

    Args:
        ex: the executor.
        run_dir: the run directory.
        num_parts: the number of parts.
    """
    dedup = work_paths(run_dir)["dedup"]
    sources = {}
    for stage, _ in DEDUPS:
        done = read_marker(dedup / f"{stage}.json")
        if done is not None and done.get("result"):
            sources[stage] = done["result"]
    marker = dedup / f"{NAMES}.json"
    done = read_marker(marker)
    if done is not None and (done.get("sources") != sources or "result" not in done):
        done = None
    for old in dedup.glob(f"{NAMES}-*"):
        if done is None or old.name != done["result"]:
            old.rmtree()
    if done is not None:
        return
    out_dir = dedup / f"{NAMES}-{uuid.uuid4().hex[:12]}"
    survivors = []
    for kind, (stage, column) in enumerate(DEDUPS):
        files = _result_files(dedup, sources[stage]) if stage in sources else []
        if files:
            rows = ex.read_parquet(files, ["key", column])
            to_join = functools.partial(survivor_rows, kind=kind, column=column)
            survivors.append(ex.map_batches(rows, to_join, batch_format="pyarrow"))
    if survivors:
        filtered = [work_paths(run_dir)["filtered"] / part_name(i) for i in range(num_parts)]
        docs = ex.read_parquet(filtered, ["key", "id"])
        rows = ex.map_batches(docs, document_rows, batch_format="pyarrow")
        for s in survivors:
            rows = ex.union(rows, s)
        nbytes = column_bytes(filtered, ["key", "id"])
        names = ex.shuffle(rows, ["key"], attach_ids, nbytes=nbytes, batch_format="pyarrow")
        ex.write_by_part(ex.materialize(names), out_dir)
    else:
        out_dir.mkdirs()
    marker.write_json({"result": out_dir.name, "sources": sources})


def _duplicate_of(names: pa.Table | None, keys: np.ndarray, mask: np.ndarray) -> pa.Array:
    """The survivor's id for each duplicate of ``keys`` selected by ``mask`` (null: unknown).

    An exact copy whose first copy is itself a near duplicate is in that near-duplicate
    cluster too (identical texts share every band), whose root is the one survivor: the
    MinHash root is named where there is one, else the exact group's first document.
    """
    n = int(mask.sum())
    if names is None:
        return pa.nulls(n, pa.string())
    fuzzy = _names_of_kind(names, keys[mask], 1)
    return pc.coalesce(fuzzy, _names_of_kind(names, keys[mask], 0))


def _names_of_kind(names: pa.Table, want: np.ndarray, kind: int) -> pa.Array:
    """The ``duplicate_of`` of ``kind`` rows (0 exact, 1 MinHash) for the keys ``want``."""
    n = want.size
    of_kind = names.filter(pc.equal(names.column("kind"), kind))
    nk = of_kind.column("key").to_numpy(zero_copy_only=False)
    order = np.argsort(nk, kind="stable")
    pos = np.searchsorted(nk[order], want)
    found = pos < nk.size
    found[found] &= nk[order][pos[found]] == want[found]
    if not nk.size:
        return pa.nulls(n, pa.string())
    ids = of_kind.column("duplicate_of").cast(pa.string()).combine_chunks()
    got = ids.take(pa.array(order[np.minimum(pos, nk.size - 1)]))
    return pc.if_else(pa.array(found), got, pa.scalar(None, pa.string()))


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
    exact = _dup_keys(p["dedup"] / "exact.json", part, ["key"])
    fuzzy = _dup_keys(p["dedup"] / "minhash.json", part, ["key"])
    names = _dup_keys(p["dedup"] / f"{NAMES}.json", part, NAMES_SCHEMA.names)
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
    for step, on, drop, alive in (
        ("exact_dedup", spec.dedup.exact.enabled, is_exact, np.ones(keys.size, bool)),
        ("minhash_dedup", spec.dedup.minhash.enabled, is_fuzzy, ~is_exact),
    ):
        if not on:  # a disabled step has no row in the stats
            continue
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
                        "duplicate_of": _duplicate_of(names, keys, mask),
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

    def __init__(
        self, spec: DataSpec, run_dir: Location, num_parts: int, progress: bool = False
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.num_parts = num_parts
        self.progress = progress

    def run(self, ex: Executor) -> dict[str, Any]:
        """Name the duplicates' survivors, then finalise the parts whose marker is missing;
        every part's statistics, summed."""
        name_duplicates(ex, self.run_dir, self.num_parts)
        task = functools.partial(
            finalize_task,
            spec_json=self.spec.model_dump_json(),
            run_dir=self.run_dir.uri,
            fields=metadata_fields(self.run_dir, self.num_parts),
        )
        items = [{"part": i} for i in range(self.num_parts)]
        marker_dir = work_paths(self.run_dir)["final_done"]
        stage = PartStage(self.name, items, task, marker_dir, progress=self.progress)
        return stage.run(ex)


def finalize_stage(
    spec: DataSpec, run_dir: Location, num_parts: int, progress: bool = False
) -> FinalizeStage:
    """The finalise stage over parts ``0 .. num_parts - 1`` (``progress``: show it)."""
    return FinalizeStage(spec, run_dir, num_parts, progress)
