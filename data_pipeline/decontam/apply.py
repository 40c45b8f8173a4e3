"""A part's contaminated documents, from the committed matches: the rule (which eval set), the
first contaminated n-gram in reading order, the stats, the exclusion and audit rows.

Called by the finalise task of each part, after dedup (a duplicate is counted by dedup, not
here). Only the documents with matches are read again for their n-grams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crucible.cluster.storage import Location
from crucible.data_pipeline.decontam.ngrams import ngram_hashes, ngram_text
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.run_dir import read_marker
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.writers.parquet import EXCLUSION_SCHEMA, AtomicParquetWriter

STEP = "decontaminate"
AUDIT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("eval_set", pa.string()),
        ("ngram", pa.string()),
        ("dropped", pa.bool_()),
    ]
)


@dataclass
class PartContamination:
    """The contaminated documents of one part.

    Attributes:
        drop: per row of the part, whether it is dropped (all false with ``action: mark``).
        stats: the ``decontaminate`` step's statistics.
        exclusions: exclusion rows (rule ``decontaminate/<eval set>``) of the dropped rows.
        audit: ``{id, source, eval_set, ngram, dropped}`` of every contaminated row.
    """

    drop: np.ndarray
    stats: dict[str, Any]
    exclusions: pa.Table
    audit: pa.Table

    def write_audit(self, loc: Location) -> None:
        """Publish the audit rows at ``loc`` (a Parquet file, written whole)."""
        w = AtomicParquetWriter(loc, AUDIT_SCHEMA)
        w.write(self.audit)
        w.commit()


def _matches(marker: Location, part: int) -> pa.Table | None:
    """The committed ``{key, hash, set}`` matches of part ``part`` (None: no committed result)."""
    done = read_marker(marker)
    if done is None or not done.get("result"):
        return None
    files = (marker.parent / done["result"] / "matches" / f"part={part}").glob("*.parquet")
    cols = ["key", "hash", "set"]
    if not files:
        schema = pa.schema([("key", pa.int64()), ("hash", pa.uint64()), ("set", pa.int32())])
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f.open_read(), columns=cols) for f in files])


def part_contamination(
    spec: DataSpec, marker: Location, part: int, table: pa.Table, alive: np.ndarray
) -> PartContamination | None:
    """The contaminated documents among the ``alive`` rows of part ``part``.

    Args:
        spec: the data spec (``decontaminate`` and ``output``).
        marker: the decontamination stage's marker, naming the committed result.
        part: the part index.
        table: the part's filtered rows (``key``, ``id``, ``source``, ``text``).
        alive: rows still kept after dedup.

    Returns:
        None when decontamination is off (or found no committed result).
    """
    dc = spec.decontaminate
    matches = _matches(marker, part) if dc.enabled else None
    if matches is None:
        return None
    names = list(dc.eval_sets)
    keys = table.column("key").to_numpy()
    order = np.lexsort((matches.column("hash").to_numpy(), matches.column("key").to_numpy()))
    m_key = matches.column("key").to_numpy()[order]
    m_hash = matches.column("hash").to_numpy()[order]
    m_set = matches.column("set").to_numpy()[order]
    rows = np.flatnonzero(alive & np.isin(keys, m_key))
    hits = table.take(pa.array(rows, pa.int64())).select(["id", "source", "text"]).to_pylist()
    starts = np.searchsorted(m_key, keys[rows], side="left").tolist()
    ends = np.searchsorted(m_key, keys[rows], side="right").tolist()
    sets, grams = [], []  # per matched row: its eval set, its first contaminated n-gram
    for doc, a, b in zip(hits, starts, ends, strict=True):
        hashes = ngram_hashes(doc["text"], dc.n_grams)
        i = int(np.argmax(np.isin(hashes, m_hash[a:b])))  # first in reading order
        sets.append(names[m_set[a + int(np.searchsorted(m_hash[a:b], hashes[i]))]])
        grams.append(ngram_text(doc["text"], dc.n_grams, i))
    drop = np.zeros(keys.size, dtype=bool)
    if dc.action == "drop":
        drop[rows] = True

    nbytes = np.asarray(pc.binary_length(pc.cast(table.column("text"), pa.binary())), np.int64)
    s = StepStats()
    s.docs_in, s.bytes_in = int(alive.sum()), int(nbytes[alive].sum())
    s.docs_out, s.bytes_out = int((alive & ~drop).sum()), int(nbytes[alive & ~drop].sum())
    for name in sets:
        s.counters[f"contaminated_{name}"] += 1
        if dc.action == "drop":
            s.dropped[name] += 1
    audit = pa.table(
        {
            "id": [d["id"] for d in hits],
            "source": [d["source"] for d in hits],
            "eval_set": sets,
            "ngram": grams,
            "dropped": [dc.action == "drop"] * len(hits),
        },
        schema=AUDIT_SCHEMA,
    )
    out = spec.output
    dropped = hits if dc.action == "drop" else []
    exclusions = pa.table(
        {
            "id": [d["id"] for d in dropped],
            "source": [d["source"] for d in dropped],
            "rule": [f"{STEP}/{name}" for name in sets[: len(dropped)]],
            "text": [
                d["text"][: out.max_exclusion_text_chars] if out.exclusion_text else None
                for d in dropped
            ],
            "duplicate_of": pa.nulls(len(dropped), pa.string()),
        },
        schema=EXCLUSION_SCHEMA,
    )
    return PartContamination(drop, {STEP: s.to_dict()}, exclusions, audit)
