"""An input file's format (JSONL, Parquet, WARC, WET) and compression (gzip, zstd), from its
bytes first and its name second: a file whose name and content disagree is read as its content
says, with a warning."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import zstandard

from crucible.cluster.storage import location
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.file_errors import warn

HEAD = 4096  # bytes read to recognise a file (and, decompressed, its container)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True, slots=True)
class FileFormat:
    """What a file holds: ``kind`` (``jsonl``, ``parquet``, ``warc``, ``wet``) and its
    ``compression`` (``gzip``, ``zstd`` or None)."""

    kind: str
    compression: str | None = None

    def describe(self) -> str:
        """``jsonl``, ``gzip-compressed jsonl``, ..."""
        return f"{self.compression}-compressed {self.kind}" if self.compression else self.kind


def name_format(path: str) -> FileFormat:
    """The format a file's name announces (``.jsonl``, ``.warc.gz``, ``.wet.zst``, ...)."""
    name = path.lower()
    compression = None
    if name.endswith(".gz"):
        compression, name = "gzip", name[:-3]
    elif name.endswith(".zst"):
        compression, name = "zstd", name[:-4]
    if name.endswith(".wet"):
        return FileFormat("wet", compression)
    if name.endswith(".warc"):
        return FileFormat("warc", compression)
    if name.endswith(".parquet"):
        return FileFormat("parquet", compression)
    return FileFormat("jsonl", compression)


def _decompressed_head(raw: bytes, compression: str | None) -> bytes:
    """The first bytes of ``raw`` decompressed (empty when they cannot be)."""
    try:
        if compression == "gzip":
            return zlib.decompressobj(47).decompress(raw, HEAD)
        if compression == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw))
            return reader.read(HEAD)
    except (zlib.error, zstandard.ZstdError):
        return b""
    return raw


def content_format(head: bytes, named: FileFormat) -> FileFormat:
    """The format of a file whose first (raw) bytes are ``head``; ``named`` settles what the
    bytes leave open (WARC or WET, and a text file that is neither JSON nor WARC)."""
    if head.startswith(PARQUET_MAGIC):
        return FileFormat("parquet")
    compression = None
    if head.startswith(GZIP_MAGIC):
        compression = "gzip"
    elif head.startswith(ZSTD_MAGIC):
        compression = "zstd"
    text = _decompressed_head(head, compression).lstrip()
    if text.startswith(b"WARC/"):
        kind = named.kind if named.kind in ("warc", "wet") else "warc"
    elif text.startswith(b"{"):
        kind = "jsonl"
    else:
        kind = named.kind
    return FileFormat(kind, compression)


def detect_format(path: str, stats: StepStats) -> FileFormat:
    """The format of ``path`` from its first bytes; a disagreement with its name is counted
    (``format_mismatch``) and logged, and the content wins."""
    with location(path).open_stream() as f:
        head = f.read(HEAD)
    named = name_format(path)
    found = content_format(head, named)
    if found != named:
        stats.counters["format_mismatch"] += 1
        warn(
            f"input {path}: named as {named.describe()} but holds {found.describe()}; "
            f"reading it as {found.describe()} (rename the file to silence this)"
        )
    return found
