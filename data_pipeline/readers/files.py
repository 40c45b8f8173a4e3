"""Input discovery and byte streams that survive truncated or corrupt compressed files."""

from __future__ import annotations

import glob
import io
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from crucible.data_pipeline.step import StepStats
from crucible.errors import CrucibleError

CHUNK = 1 << 20
SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
SUFFIXES += (".parquet", ".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet", ".warc.wet.gz")


def input_format(path: str) -> str:
    """``jsonl``, ``parquet``, ``warc`` or ``wet`` from a file name."""
    name = path.lower()
    if name.endswith((".wet", ".wet.gz")):
        return "wet"
    if name.endswith((".warc", ".warc.gz")):
        return "warc"
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (files, directories, globs), sorted, without repeats.

    Args:
        patterns: paths, directories (searched recursively for known suffixes) or globs.

    Raises:
        CrucibleError: a pattern matches nothing.
    """
    found: set[str] = set()
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            matches = [
                str(f.resolve())
                for f in p.rglob("*")
                if f.is_file() and f.name.lower().endswith(SUFFIXES)
            ]
        elif p.is_file():
            matches = [str(p.resolve())]
        else:
            matches = [
                str(Path(m).resolve())
                for m in glob.glob(str(p), recursive=True)
                if os.path.isfile(m)
            ]
        if not matches:
            raise CrucibleError(
                f"data input {pattern!r} matches no file; check the path in data.inputs"
            )
        found.update(matches)
    return sorted(found)


def _raw_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _member_chunks(
    path: str, stats: StepStats, new: Callable[[], Any], error: type[Exception]
) -> Iterator[bytes]:
    """Decompress a file of one or more concatenated members (gzip or zstd frames).

    A corrupt stream stops the file with ``corrupt_compressed_file`` counted; a truncated last
    member yields what it holds and counts ``truncated_file``. Never raises.
    """
    d = new()
    fed = False
    try:
        for chunk in _raw_chunks(path):
            while chunk:
                fed = True
                yield d.decompress(chunk)
                if d.eof:
                    chunk = d.unused_data
                    d = new()
                    fed = False
                else:
                    chunk = b""
    except error:
        stats.counters["corrupt_compressed_file"] += 1
        return
    if fed and not d.eof:
        if hasattr(d, "flush"):
            yield d.flush()
        stats.counters["truncated_file"] += 1


def _zstd_chunks(path: str, stats: StepStats) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    return _member_chunks(path, stats, dctx.decompressobj, zstandard.ZstdError)


def _gzip_chunks(path: str, stats: StepStats) -> Iterator[bytes]:
    return _member_chunks(path, stats, lambda: zlib.decompressobj(47), zlib.error)


def byte_chunks(path: str, stats: StepStats) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in chunks; truncation/corruption counted, never raised."""
    name = path.lower()
    if name.endswith(".gz"):
        return _gzip_chunks(path, stats)
    if name.endswith(".zst"):
        return _zstd_chunks(path, stats)
    return _raw_chunks(path)


def iter_lines(path: str, stats: StepStats) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` of every line of the decompressed file, newline stripped."""
    pending: list[bytes] = []  # pieces of a line longer than a chunk: joined once, not re-copied
    base = 0  # offset in the decompressed stream of the line being assembled
    for chunk in byte_chunks(path, stats):
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            if pending:
                pending.append(chunk[start:nl])
                line = b"".join(pending)
                pending = []
            else:
                line = chunk[start:nl]
            yield base, line
            base += len(line) + 1
            start = nl + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield base, b"".join(pending)


class ChunkStream(io.RawIOBase):
    """A readable file object over an iterator of byte chunks (for warcio)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        """Always readable."""
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``b`` from the next chunks; 0 at the end."""
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def open_decompressed(path: str, stats: StepStats) -> io.BufferedReader:
    """``path`` decompressed (gzip/zstd by suffix) as a buffered binary file object."""
    return io.BufferedReader(ChunkStream(byte_chunks(path, stats)), buffer_size=CHUNK)
