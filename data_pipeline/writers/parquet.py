"""Atomic Parquet/JSON writing and the schemas of every file the pipeline writes.

Every file is written under a temporary name in its final directory and renamed into place
(``os.replace`` is atomic on POSIX), so a reader or a rerun never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from crucible.data_pipeline.document import Document, Exclusion
from crucible.errors import CrucibleError

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
EXCLUSION_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("rule", pa.string()), ("text", pa.string())]
)


def tmp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before its rename."""
    return path.with_name(f".tmp-{path.name}")


def check_writable(directory: Path) -> None:
    """Create ``directory`` or raise a :class:`CrucibleError` saying why it cannot be used."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".crucible-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CrucibleError(
            f"cannot write to {directory}: {e.strerror or e}; choose a writable run directory"
        ) from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
        },
        schema=FILTERED_SCHEMA,
    )


class AtomicParquetWriter:
    """Row groups appended to a temporary file; :meth:`commit` renames it into place."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.tmp = tmp_path(path)
        self.schema = schema
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (skipped when empty)."""
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema))

    def commit(self) -> None:
        """Close and rename into place."""
        self._writer.close()
        os.replace(self.tmp, self.path)
