"""The per-part stages both executors run: filter a part (read -> steps -> dedup columns), and
finalise a part (drop its duplicates, write its documents and exclusions).

A part is one input file. Each stage writes its outputs atomically and a JSON marker last, so
a rerun skips finished parts and redoes unfinished ones from scratch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crucible.cluster.storage import Location
from crucible.data_pipeline.dedup.exact import text_hash
from crucible.data_pipeline.dedup.lsh import compact_signature
from crucible.data_pipeline.dedup.minhash import band_keys, signature
from crucible.data_pipeline.filters.c4 import C4
from crucible.data_pipeline.filters.fineweb import FineWeb
from crucible.data_pipeline.filters.gopher_quality import GopherQuality
from crucible.data_pipeline.filters.gopher_repetition import GopherRepetition
from crucible.data_pipeline.filters.language import LanguageFilter
from crucible.data_pipeline.normalize import Normalize
from crucible.data_pipeline.pii import PII
from crucible.data_pipeline.readers.read import Reader
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.step import Step, StepStats
from crucible.data_pipeline.writers.parquet import (
    DOCUMENT_SCHEMA,
    EXCLUSION_SCHEMA,
    FILTERED_SCHEMA,
    AtomicParquetWriter,
    exclusions_table,
    filtered_table,
    write_json_atomic,
)

EXACT_RULE = "exact_dedup/duplicate"
FUZZY_RULE = "minhash_dedup/duplicate"


def build_steps(spec: DataSpec) -> list[Step]:
    """The document steps in order (FineWeb's order: language, repetition, quality, C4,
    FineWeb; PII last, so rules see the original text)."""
    steps: list[Step] = []
    if spec.normalize.enabled:
        steps.append(Normalize(spec.normalize))
    if spec.language.enabled:
        steps.append(LanguageFilter(spec.language))
    if spec.gopher_repetition.enabled:
        steps.append(GopherRepetition(spec.gopher_repetition))
    if spec.gopher_quality.enabled:
        steps.append(GopherQuality(spec.gopher_quality))
    if spec.c4.enabled:
        steps.append(C4(spec.c4))
    if spec.fineweb.enabled:
        steps.append(FineWeb(spec.fineweb))
    if spec.pii.enabled:
        steps.append(PII(spec.pii))
    return steps


def part_name(part: int) -> str:
    """File name of part ``part``."""
    return f"part-{part:05d}.parquet"


def work_paths(run_dir: Location) -> dict[str, Location]:
    """The run's working and output directories."""
    work = run_dir / "_work"
    return {
        "work": work,
        "filtered": work / "filtered",
        "excluded": work / "excluded",
        "filter_done": work / "filter_done",
        "dedup": work / "dedup",
        "final_done": work / "final_done",
        "documents": run_dir / "documents",
        "exclusions": run_dir / "exclusions",
    }


def filter_part(part: int, path: str, spec: DataSpec, run_dir: Location) -> dict[str, Any]:
    """Read input ``path`` as part ``part`` through every step; write the survivors (with their
    text hash, band keys and compact signature), the exclusions and the part's stats (the marker, last).

    Args:
        part: index of the input in the sorted input list.
        path: the input file.
        spec: the data spec.
        run_dir: the run directory.
    """
    p = work_paths(run_dir)
    name = part_name(part)
    reader = Reader(spec.reader)
    steps = build_steps(spec)
    docs = reader.run(path, part)
    for step in steps:
        docs = step.run(docs)
    mh = spec.dedup.minhash
    out = AtomicParquetWriter(p["filtered"] / name, FILTERED_SCHEMA)
    exc = AtomicParquetWriter(p["excluded"] / name, EXCLUSION_SCHEMA)
    keep_text, max_chars = spec.output.exclusion_text, spec.output.max_exclusion_text_chars
    holders: list[Any] = [reader, *steps]

    def flush(batch: list, hashes: list, bands: list, sigs: list) -> None:
        out.write(filtered_table(batch, hashes, bands, sigs))
        for h in holders:
            if h.exclusions:
                exc.write(exclusions_table(h.exclusions, keep_text, max_chars))
                h.exclusions.clear()

    batch, hashes, bands, sigs = [], [], [], []
    for doc in docs:
        batch.append(doc)
        hashes.append(text_hash(doc.text))
        sig = signature(doc.text, mh) if mh.enabled else None
        bands.append(band_keys(sig, mh).tolist() if sig is not None else [])
        sigs.append(compact_signature(sig).tolist() if sig is not None else [])
        if len(batch) >= spec.reader.batch_size:
            flush(batch, hashes, bands, sigs)
            batch, hashes, bands, sigs = [], [], [], []
    flush(batch, hashes, bands, sigs)
    out.commit()
    exc.commit()
    stats = {h.name: h.stats.to_dict() for h in holders}
    write_json_atomic(p["filter_done"] / f"part-{part:05d}.json", stats)
    return stats


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
    docs.commit()
    excl.commit()
    write_json_atomic(p["final_done"] / f"part-{part:05d}.json", stats)
    return stats


def read_marker(loc: Location) -> dict[str, Any] | None:
    """A stage marker's stats, or None when the stage has not finished."""
    try:
        data = loc.read_json()
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None
