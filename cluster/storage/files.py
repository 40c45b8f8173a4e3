"""Node-local files: the one sha256 of a file, the one atomic (and durable) write, fsync,
and the node-local scratch directory."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 8 << 20


def sha256_stream(f: BinaryIO | Any) -> str:
    """Hex sha256 of everything left in the binary stream ``f``, read in 8 MiB chunks.

    Args:
        f: an open binary file or ``pyarrow`` input stream.
    """
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file.

    Args:
        path: the file.
    """
    with open(path, "rb") as f:
        return sha256_stream(f)


def fsync_path(path: Path) -> None:
    """fsync a file or directory (a directory: the names in it are durable).

    Args:
        path: the file or directory.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace local file ``path`` with ``data``: readers see the old bytes or the new.

    A temporary sibling is written, fsynced (``durable``), renamed into place, and the
    directory fsynced (``durable``), so after a crash the file is the old or the new one.

    Args:
        path: the file.
        data: its new contents.
        durable: fsync before returning.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_path(path.parent)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON every crucible file holds: indented, keys sorted, newline-ended."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json_file(path: Path, obj: Any) -> None:
    """Replace local file ``path`` with ``obj`` as JSON, atomically and durably.

    Args:
        path: the file.
        obj: JSON-serialisable data.
    """
    write_atomic(path, json_bytes(obj))


def scratch_dir(*parts: str) -> Path:
    """A node-local directory for staging and caches (``$CRUCIBLE_SCRATCH`` or the temp dir).

    Args:
        *parts: subdirectories below the scratch root.
    """
    root = os.environ.get("CRUCIBLE_SCRATCH") or os.path.join(
        tempfile.gettempdir(), f"crucible-scratch-{os.getuid()}"
    )
    d = Path(root, *parts)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def cache_key(uri: str) -> str:
    """A short file name for a URI's node-local cache."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]
