"""DeepSpeed's ``torch.save`` checkpoint engine, hashing and fsyncing each file as it writes it.

A checkpoint's manifest holds the sha256 of every file. Hashing after the save means reading
every byte back (and, on a disk slower than the page cache fills, waiting for writeback first);
hashing the bytes on their way to the file costs the hash alone, and it runs while the kernel
is still flushing earlier pages. :func:`crucible.jobs.train.checkpoint.hash_own_files` takes
the digests recorded here and re-reads only the files DeepSpeed wrote some other way.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

_OVERLAP_BYTES = 1 << 20
_WRITEBACK_BYTES = 32 << 20


def _start_writeback() -> Callable[[int, int, int], Any] | None:
    """Start writeback of a written stretch of a file, without waiting, where the OS can.

    Linux's ``posix_fadvise(POSIX_FADV_DONTNEED)`` starts writeback of the range's dirty pages
    (and drops clean ones: a checkpoint is not read again soon). Started as each stretch is
    written, the disk writes while the rest is still serialised and hashed, so the closing
    fsync waits for the tail only (PostgreSQL's ``checkpoint_flush_after`` and RocksDB's
    ``bytes_per_sync`` do the same with ``sync_file_range``, which Python's ``os`` lacks).
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return None
    return lambda fd, offset, nbytes: os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class _HashingWriter:
    """A write-only file object that feeds every byte to sha256 on its way to ``f``.

    A large chunk is hashed on a second thread while this one writes it (both release the
    GIL), so a save costs max(write, hash) rather than their sum. Every
    :data:`_WRITEBACK_BYTES` written, the disk is told to start writing them back.
    """

    def __init__(self, f: BinaryIO, pool: ThreadPoolExecutor) -> None:
        self._f = f
        self._pool = pool
        self._writeback = _start_writeback()
        self._flushed_to = 0  # bytes already handed to writeback
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: Any) -> int:
        if memoryview(data).nbytes < _OVERLAP_BYTES:
            self.sha256.update(data)
            n = self._f.write(data)
        else:
            hashed = self._pool.submit(self.sha256.update, data)
            n = self._f.write(data)
            hashed.result()  # the caller may reuse the buffer once write returns
        self.bytes += n
        if self._writeback is not None and self.bytes - self._flushed_to >= _WRITEBACK_BYTES:
            self._f.flush()
            self._writeback(self._f.fileno(), self._flushed_to, self.bytes - self._flushed_to)
            self._flushed_to = self.bytes
        return n

    def flush(self) -> None:
        self._f.flush()


def save_hashed(obj: Any, path: Path, zipfile: bool = True) -> dict[str, Any]:
    """``torch.save(obj, path)``, fsynced; returns ``{"sha256", "bytes"}`` of what was written.

    Args:
        obj: what to save.
        path: the file to create (replaced if it exists).
        zipfile: torch's zip serialization (its default) or the legacy format.
    """
    with Path(path).open("wb") as f, ThreadPoolExecutor(1) as pool:
        w = _HashingWriter(f, pool)
        torch.save(obj, w, _use_new_zipfile_serialization=zipfile)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": w.sha256.hexdigest(), "bytes": w.bytes}


class HashingCheckpointEngine(TorchCheckpointEngine):  # type: ignore[misc]
    """:class:`TorchCheckpointEngine` that records ``{abspath: {sha256, bytes}}`` per save.

    Args:
        zipfile_serialization: torch's zip format or the legacy one, as the engine replaced.
    """

    def __init__(self, zipfile_serialization: bool) -> None:
        super().__init__()
        self.zipfile_serialization = zipfile_serialization
        self.written: dict[str, dict[str, Any]] = {}

    def save(self, state_dict: Any, path: str) -> None:
        self.written[os.path.abspath(path)] = save_hashed(
            state_dict, Path(path), bool(self.zipfile_serialization)
        )


def install(engine: DeepSpeedEngine) -> HashingCheckpointEngine | None:
    """Swap a DeepSpeed engine's plain ``torch.save`` engine for the hashing one.

    Other engines (DeepSpeed's fast, decoupled or DataStates writers, chosen in the DeepSpeed
    config) are left alone; their files are hashed after the save.

    Args:
        engine: the ``deepspeed.initialize`` engine.

    Returns:
        The hashing engine, or None where another engine was configured.
    """
    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is not TorchCheckpointEngine:
        return None
    hashing = HashingCheckpointEngine(bool(current.zipfile_serialization))
    engine.checkpoint_engine = hashing
    return hashing
