"""Atomic Parquet writing and the schemas of every file the pipeline writes.

Every file is written through :meth:`crucible.cluster.storage.Location.writing`: renamed into
place on local filesystems, uploaded as one object on object stores, so a reader or a rerun
never sees half a file.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from crucible.cluster.storage import Location
from crucible.data_pipeline.document import Document, Exclusion
from crucible.data_pipeline.writers.metadata import to_json

DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
    ]
)
# Intermediate rows carry the dedup key, the exact-text hash, the LSH band keys and the
# compact MinHash signature (candidate pairs are verified against it).
FILTERED_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("key", pa.int64()))
FILTERED_SCHEMA = FILTERED_SCHEMA.append(pa.field("text_hash", pa.string()))
FILTERED_SCHEMA = FILTERED_SCHEMA.append(pa.field("bands", pa.list_(pa.uint64())))
FILTERED_SCHEMA = FILTERED_SCHEMA.append(pa.field("signature", pa.list_(pa.uint32())))
# the input's other fields as one JSON object text; typed in the clean documents
# (see crucible.data_pipeline.writers.metadata)
FILTERED_SCHEMA = FILTERED_SCHEMA.append(pa.field("metadata", pa.string()))
# duplicate_of: the id of the kept document a duplicate repeats (its cluster's survivor);
# null for every other rule
EXCLUSION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("rule", pa.string()),
        ("text", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)


def document_schema(metadata: pa.StructType | None) -> pa.Schema:
    """The clean documents' schema: :data:`DOCUMENT_SCHEMA`, then the ``metadata`` struct
    when the inputs have fields besides text, id and url."""
    if metadata is None:
        return DOCUMENT_SCHEMA
    return DOCUMENT_SCHEMA.append(pa.field("metadata", metadata))


def exclusions_table(rows: list[Exclusion], keep_text: bool, max_chars: int) -> pa.Table:
    """Exclusion records as a table (texts cut to ``max_chars`` or left out)."""
    return pa.table(
        {
            "id": [e.id for e in rows],
            "source": [e.source for e in rows],
            "rule": [e.rule for e in rows],
            "text": [
                (e.text[:max_chars] if keep_text and e.text is not None else None) for e in rows
            ],
            "duplicate_of": pa.nulls(len(rows), pa.string()),
        },
        schema=EXCLUSION_SCHEMA,
    )


def filtered_table(
    docs: list[Document],
    hashes: list[str],
    bands: list[list[int]],
    signatures: list[list[int]],
) -> pa.Table:
    """Surviving documents of a part, with their dedup columns."""
    return pa.table(
        {
            "id": [d.id for d in docs],
            "text": [d.text for d in docs],
            "source": [d.source for d in docs],
            "url": [d.url for d in docs],
            "language": [d.language for d in docs],
            "language_score": [d.language_score for d in docs],
            "key": [d.key for d in docs],
            "text_hash": hashes,
            "bands": bands,
            "signature": signatures,
            "metadata": [to_json(d.metadata) for d in docs],
        },
        schema=FILTERED_SCHEMA,
    )


class AtomicParquetWriter:
    """Row groups written to a pending file; :meth:`commit` publishes it at ``loc``."""

    def __init__(self, loc: Location, schema: pa.Schema) -> None:
        self.loc = loc
        self.schema = schema
        self._pending = loc.writing()
        self._writer = pq.ParquetWriter(self._pending.path, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (skipped when empty)."""
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema))

    def commit(self) -> None:
        """Close and publish."""
        self._writer.close()
        self._pending.commit()
