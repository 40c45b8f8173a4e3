"""Append-only JSON-lines logs that work on every filesystem, object stores included."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from crucible.cluster.storage.location import Location
from crucible.cluster.storage.uri import location


class JsonlLog:
    """An append-only JSON-lines log at ``loc``, for one writer at a time.

    On filesystems that append (local disk, NFS) each record is one ``write`` to ``loc``,
    fsynced on ``sync`` records and at most every ``sync_every_s`` otherwise. Object stores
    cannot append: records are buffered and the current segment (``loc``, then ``loc.1``,
    ``loc.2``, ... of at most ``segment_bytes`` each) is written again as one object on
    ``sync`` records and at most every ``sync_every_s``. Either way a killed writer loses at
    most the records since the last sync; :func:`read_jsonl` reads every segment in order.

    Args:
        loc: the log file.
        sync_every_s: sync at most this often (besides ``sync=True`` records and close).
        segment_bytes: object stores: bytes per segment object before a new one starts.
    """

    def __init__(
        self, loc: Location, sync_every_s: float = 1.0, segment_bytes: int = 1 << 20
    ) -> None:
        self.loc = loc
        self.sync_every_s = sync_every_s
        self.segment_bytes = segment_bytes
        self._last_sync = time.monotonic()
        self._fd: int | None = None
        self._segment = 0
        self._buffer = bytearray()
        self._dirty = False
        if loc.renames and loc.is_local:
            Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(loc.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        elif loc.renames:
            loc.parent.mkdirs()
            self._stream = loc.fs.open_append_stream(loc.path, compression=None)
        else:
            segments = _segments(loc)
            if segments:
                self._segment = len(segments) - 1
                self._buffer = bytearray(segments[-1].read_bytes())

    def append(self, record: dict[str, Any], sync: bool = False) -> None:
        """Add one record; ``sync`` makes it durable before returning.

        Args:
            record: JSON-serialisable mapping.
            sync: make it (and every earlier record) durable now.
        """
        line = (json.dumps(record) + "\n").encode()
        now = time.monotonic()
        due = sync or now - self._last_sync >= self.sync_every_s
        if self._fd is not None:
            os.write(self._fd, line)
            if due:
                os.fsync(self._fd)
        elif self.loc.renames:
            self._stream.write(line)
            if due:
                self._stream.flush()
        else:
            if self._buffer and len(self._buffer) + len(line) > self.segment_bytes:
                self._put()
                self._segment += 1
                self._buffer = bytearray()
            self._buffer += line
            self._dirty = True
            if due:
                self._put()
        if due:
            self._last_sync = now

    def _put(self) -> None:
        if self._dirty:
            _segment_location(self.loc, self._segment).write_bytes(bytes(self._buffer))
            self._dirty = False

    def flush(self) -> None:
        """Make every record so far durable."""
        if self._fd is not None:
            os.fsync(self._fd)
        elif self.loc.renames:
            self._stream.flush()
        else:
            self._put()
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Flush and release the file."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        elif self.loc.renames:
            self._stream.close()


def _segment_location(loc: Location, k: int) -> Location:
    return loc if k == 0 else loc.parent / f"{loc.name}.{k}"


def _segments(loc: Location) -> list[Location]:
    out = []
    names = set(loc.parent.ls())
    k = 0
    while (loc.name if k == 0 else f"{loc.name}.{k}") in names:
        out.append(_segment_location(loc, k))
        k += 1
    return out


def read_lines(loc: Location | str | Path) -> list[str]:
    """The lines of a :class:`JsonlLog` (all segments, in order); empty if it does not exist.

    Args:
        loc: the log file.
    """
    loc = location(loc)
    out: list[str] = []
    for seg in _segments(loc):
        with contextlib.suppress(FileNotFoundError):
            out += seg.read_bytes().decode(errors="replace").splitlines()
    return out


def read_jsonl(loc: Location | str | Path) -> list[dict[str, Any]]:
    """Every record of a :class:`JsonlLog` (all segments, in order); torn or corrupt lines
    are skipped. Empty if the log does not exist.

    Args:
        loc: the log file.
    """
    out = []
    for line in read_lines(loc):
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out
