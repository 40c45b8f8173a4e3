"""Input discovery and byte streams that survive truncated or corrupt compressed files."""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from crucible.cluster.storage import describe_error, location
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.file_errors import file_failed
from crucible.errors import CrucibleError

CHUNK = 1 << 20
SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
SUFFIXES += (".parquet", ".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet", ".warc.wet.gz")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (files, directories, globs; paths or URIs), sorted, without
    repeats, as paths (local) or URIs.

    Args:
        patterns: paths or URIs of files, directories (searched recursively for known
            suffixes) or globs (``*``, ``?``, ``[...]``; ``**`` crosses directories).

    Raises:
        CrucibleError: a pattern matches nothing, or its storage cannot be read.
    """
    found: set[str] = set()
    for pattern in patterns:
        try:
            matches = _expand(pattern)
        except OSError as e:
            raise CrucibleError(
                describe_error(location(_glob_base(pattern)), e) + " (in data.inputs)"
            ) from None
        if not matches:
            raise CrucibleError(
                f"data input {pattern!r} matches no file; check the path in data.inputs"
            )
        found.update(matches)
    return sorted(found)


def _glob_base(pattern: str) -> str:
    """The part of ``pattern`` before its first path component with a wildcard."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:i]) or "."
    return pattern


def _expand(pattern: str) -> list[str]:
    if "://" not in pattern:
        pattern = str(Path(pattern).expanduser())
    base = _glob_base(pattern)
    loc = location(base)
    if base == pattern:  # no wildcard: a file, or a directory to search
        if loc.is_file():
            return [loc.uri]
        if loc.is_dir():
            return [(loc / rel).uri for rel in loc.walk() if rel.lower().endswith(SUFFIXES)]
        return []
    regex = _glob_regex(pattern[len(base) :].lstrip("/"))
    return [(loc / rel).uri for rel in loc.walk() if regex.fullmatch(rel)]


def _glob_regex(glob: str) -> re.Pattern[str]:
    """A glob over relative POSIX paths as a regex: ``*`` and ``?`` stay within a directory,
    ``**/`` matches any number of directories (as ``glob.glob(recursive=True)``)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) > 0:
            body = glob[i + 1 : end]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def _raw_chunks(path: str) -> Iterator[bytes]:
    with location(path).open_stream() as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _member_chunks(
    path: str, stats: StepStats, new: Callable[[], Any], error: type[Exception], name: str
) -> Iterator[bytes]:
    """Decompress a file of one or more concatenated members (gzip or zstd frames).

    A corrupt stream stops the file (``files/corrupt``); a truncated last member yields what
    it holds (``files/truncated``): both are warned about, never raised.
    """
    d = new()
    fed = False
    out = 0  # decompressed bytes so far, for the warning
    try:
        for chunk in _raw_chunks(path):
            while chunk:
                fed = True
                data = d.decompress(chunk)
                out += len(data)
                yield data
                if d.eof:
                    chunk = d.unused_data
                    d = new()
                    fed = False
                else:
                    chunk = b""
    except error as e:
        file_failed(
            stats, path, "corrupt", f"corrupt {name} data after {out} bytes ({e}); rest skipped"
        )
        return
    if fed and not d.eof:
        if hasattr(d, "flush"):
            yield d.flush()
        file_failed(stats, path, "truncated", f"{name} stream cut short after {out} bytes")


def _zstd_chunks(path: str, stats: StepStats) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    return _member_chunks(path, stats, dctx.decompressobj, zstandard.ZstdError, "zstd")


def _gzip_chunks(path: str, stats: StepStats) -> Iterator[bytes]:
    return _member_chunks(path, stats, lambda: zlib.decompressobj(47), zlib.error, "gzip")


def byte_chunks(path: str, stats: StepStats, compression: str | None) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in chunks; truncation/corruption counted, never raised.

    Args:
        path: the file.
        stats: the reader's counters.
        compression: ``gzip``, ``zstd`` or None (see :mod:`.formats`).
    """
    if compression == "gzip":
        return _gzip_chunks(path, stats)
    if compression == "zstd":
        return _zstd_chunks(path, stats)
    return _raw_chunks(path)


def iter_lines(
    path: str, stats: StepStats, compression: str | None
) -> Iterator[tuple[int, bytes, bool]]:
    """``(byte offset, line, ended)`` of every line of the decompressed file, newline
    stripped; ``ended`` is False only for a last line without its newline (a cut record when
    the file is truncated)."""
    pending: list[bytes] = []  # pieces of a line longer than a chunk: joined once, not re-copied
    base = 0  # offset in the decompressed stream of the line being assembled
    for chunk in byte_chunks(path, stats, compression):
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            if pending:
                pending.append(chunk[start:nl])
                line = b"".join(pending)
                pending = []
            else:
                line = chunk[start:nl]
            yield base, line, True
            base += len(line) + 1
            start = nl + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield base, b"".join(pending), False


class ChunkStream(io.RawIOBase):
    """A readable file object over an iterator of byte chunks (for warcio)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self.total = 0  # bytes handed out so far

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
        self.total += n
        return n


def open_decompressed(path: str, stats: StepStats, compression: str | None) -> io.BufferedReader:
    """``path`` decompressed (``gzip``, ``zstd`` or None) as a buffered binary file object."""
    chunks = byte_chunks(path, stats, compression)
    return io.BufferedReader(ChunkStream(chunks), buffer_size=CHUNK)
