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
    texts = table.column("text").to_pylist()
    order = np.lexsort((matches.column("hash").to_numpy(), matches.column("key").to_numpy()))
    m_key = matches.column("key").to_numpy()[order]
    m_hash = matches.column("hash").to_numpy()[order]
    m_set = matches.column("set").to_numpy()[order]
    hit = np.flatnonzero(alive & np.isin(keys, m_key))
    starts = np.searchsorted(m_key, keys[hit], side="left")
    ends = np.searchsorted(m_key, keys[hit], side="right")
    found_set = np.full(keys.size, -1, dtype=np.int64)
    found_gram: dict[int, str] = {}
    for r, a, b in zip(hit.tolist(), starts.tolist(), ends.tolist(), strict=True):
        hashes = ngram_hashes(texts[r], dc.n_grams)
        at = np.isin(hashes, m_hash[a:b])
        if not at.any():  # the matches were found in this very text: cannot happen
            continue
        i = int(np.argmax(at))  # the first contaminated n-gram in reading order
        found_set[r] = m_set[a + int(np.searchsorted(m_hash[a:b], hashes[i]))]
        found_gram[r] = ngram_text(texts[r], dc.n_grams, i)
    hit = np.flatnonzero(found_set >= 0)
    contaminated = found_set >= 0
    drop = contaminated if dc.action == "drop" else np.zeros(keys.size, dtype=bool)

    nbytes = np.asarray(pc.binary_length(pc.cast(table.column("text"), pa.binary())), np.int64)
    s = StepStats()
    s.docs_in, s.bytes_in = int(alive.sum()), int(nbytes[alive].sum())
    s.docs_out, s.bytes_out = int((alive & ~drop).sum()), int(nbytes[alive & ~drop].sum())
    for r in hit.tolist():
        s.counters[f"contaminated_{names[found_set[r]]}"] += 1
        if drop[r]:
            s.dropped[names[found_set[r]]] += 1

    rows = hit.tolist()
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist()
    audit = pa.table(
        {
            "id": [ids[r] for r in rows],
            "source": [sources[r] for r in rows],
            "eval_set": [names[found_set[r]] for r in rows],
            "ngram": [found_gram[r] for r in rows],
            "dropped": [bool(drop[r]) for r in rows],
        },
        schema=AUDIT_SCHEMA,
    )
    out = spec.output
    dropped = [r for r in rows if drop[r]]
    exclusions = pa.table(
        {
            "id": [ids[r] for r in dropped],
            "source": [sources[r] for r in dropped],
            "rule": [f"{STEP}/{names[found_set[r]]}" for r in dropped],
            "text": [
                texts[r][: out.max_exclusion_text_chars] if out.exclusion_text else None
                for r in dropped
            ],
        },
        schema=EXCLUSION_SCHEMA,
    )
    return PartContamination(drop, {STEP: s.to_dict()}, exclusions, audit)
