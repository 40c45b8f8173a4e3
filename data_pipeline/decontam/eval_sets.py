"""Evaluation sets: their files found, their records read as texts, and each file indexed as
the distinct hashes of its n-grams (:mod:`.ngrams`).

An index file holds ``{hash, key}`` rows whose ``key`` is ``-(set index + 1)``: training rows
carry their document key, which is never negative, so one column tells the two sides apart in
the join (:mod:`.overlap`).
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from crucible.cluster.storage import location
from crucible.data_pipeline.decontam.ngrams import ngram_hashes
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.files import expand_inputs
from crucible.data_pipeline.spec import DecontaminationSpec
from crucible.data_pipeline.writers.parquet import AtomicParquetWriter
from crucible.errors import CrucibleError

NGRAM_SCHEMA = pa.schema([("hash", pa.uint64()), ("key", pa.int64())])
EVAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
COMPRESSED = ("", ".gz", ".zst")


def eval_files(dc: DecontaminationSpec) -> list[dict[str, Any]]:
    """``{set, path}`` of every file of every eval set (``set``: the set's index in the spec).

    Raises:
        CrucibleError: a path of an eval set matches no file.
    """
    out: list[dict[str, Any]] = []
    for i, (name, es) in enumerate(dc.eval_sets.items()):
        found: set[str] = set()
        for pattern in es.paths:
            local = pattern if "://" in pattern else str(Path(pattern).expanduser())
            loc = location(local)
            if loc.is_dir():
                ends = tuple(s + c for s in EVAL_SUFFIXES for c in COMPRESSED)
                matches = [(loc / rel).uri for rel in loc.walk() if rel.lower().endswith(ends)]
            else:
                try:
                    matches = expand_inputs([pattern])
                except CrucibleError:
                    matches = []
            if not matches:
                raise CrucibleError(
                    f"eval set {name!r}: {pattern!r} matches no file; check "
                    f"data.decontaminate.eval_sets.{name}.paths"
                )
            found.update(matches)
        out.extend({"set": i, "path": p} for p in sorted(found))
    return out


def _text(value: Any) -> str | None:
    """A field's value as text: a string, a list's items joined, a number written out."""
    if isinstance(value, list):
        return "\n".join(t for t in map(_text, value) if t)
    if value is None or isinstance(value, dict):
        return None
    return value if isinstance(value, str) else str(value)


def _field(record: dict[str, Any], path: str) -> str | None:
    """The text at dotted ``path`` of ``record`` (None when absent)."""
    value: Any = record
    for name in path.split("."):
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    return _text(value)


def record_text(record: dict[str, Any], fields: list[str]) -> str:
    """The ``fields`` of ``record`` joined in order (n-grams then span neighbouring fields)."""
    return "\n".join(t for t in (_field(record, f) for f in fields) if t)


def _file_bytes(path: str) -> bytes:
    """The decompressed bytes of an eval file (gzip/zstd by suffix); an eval set is small and
    must be read whole, so a corrupt file is an error, not a shorter set.

    Raises:
        CrucibleError: the file cannot be decompressed.
    """
    data = location(path).read_bytes()
    name = path.lower()
    try:
        if name.endswith(".gz"):
            return gzip.decompress(data)
        if name.endswith(".zst"):
            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise CrucibleError(f"eval file {path} cannot be decompressed: {e}") from None
    return data


def eval_texts(path: str, fields: list[str], stats: StepStats) -> Iterator[str]:
    """The texts of an eval file: one per JSONL line, JSON array item or Parquet row; the whole
    of a .txt file.

    Args:
        path: the file.
        fields: the record fields joined into a text.
        stats: counts lines that are not JSON objects (``bad_lines``).
    """
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".parquet"):
        f = pq.ParquetFile(location(path).open_read())
        roots = {p.split(".")[0] for p in fields}
        cols = [c for c in f.schema_arrow.names if c in roots]
        for batch in f.iter_batches(columns=cols):
            for record in batch.to_pylist():
                yield record_text(record, fields)
        return
    data = _file_bytes(path)
    if name.endswith(".txt"):
        yield data.decode("utf-8", "replace")
        return
    records: list[Any] | None = None
    if name.endswith(".json"):  # a JSON array of records, or JSONL named .json
        try:
            whole = orjson.loads(data)
            records = whole if isinstance(whole, list) else [whole]
        except orjson.JSONDecodeError:
            records = None
    if records is None:
        records = []
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                records.append(None)
    for record in records:
        if isinstance(record, dict):
            yield record_text(record, fields)
        else:
            stats.counters["bad_lines"] += 1


def index_eval_file(item: dict[str, Any], n: int) -> dict[str, Any]:
    """Write the distinct n-gram hashes of one eval file (a task).

    Args:
        item: ``path`` (the eval file), ``set`` (the eval set's index), ``fields`` (the record
            fields joined into a text) and ``out`` (the Parquet file to write).
        n: words per n-gram.

    Returns:
        ``{texts, short_texts, ngrams, bad_lines}`` of the file.
    """
    stats = StepStats()
    hashes, texts, short = [], 0, 0
    for text in eval_texts(str(item["path"]), list(item["fields"]), stats):
        h = ngram_hashes(text, n)
        texts += 1
        short += h.size == 0
        hashes.append(h)
    distinct = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    out = AtomicParquetWriter(location(str(item["out"])), NGRAM_SCHEMA)
    key = np.full(distinct.size, -(int(item["set"]) + 1), dtype=np.int64)
    out.write(pa.table({"hash": distinct, "key": key}, schema=NGRAM_SCHEMA))
    out.commit()
    return {
        "texts": texts,
        "short_texts": short,
        "ngrams": int(distinct.size),
        "bad_lines": stats.counters["bad_lines"],
    }
