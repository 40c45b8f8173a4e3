"""Manifests: a set of files is committed by writing its list (sha256 + size per file) last,
as one object; readers trust only committed manifests."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from crucible.cluster.storage.location import Location
from crucible.cluster.storage.uri import location
from crucible.errors import CrucibleError

MANIFEST = "manifest.json"


def read_manifest(where: Location | str | Path) -> dict[str, Any] | None:
    """The manifest of a committed directory, or None if it has none (not committed).

    Args:
        where: the directory.
    """
    loc = location(where)
    try:
        data = (loc / MANIFEST).read_json()
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def write_manifest(where: Location, files: dict[str, dict[str, Any]], **extra: Any) -> dict:
    """Commit directory ``where``: write ``manifest.json`` listing ``files``, as the last write.

    Args:
        where: the directory.
        files: ``{relative path: {"sha256", "bytes"}}`` of every file it holds.
        **extra: more keys (step, world size, ...).
    """
    manifest = {
        **extra,
        "created": time.time(),
        "total_bytes": sum(int(v["bytes"]) for v in files.values()),
        "files": files,
    }
    (where / MANIFEST).write_json(manifest)
    return manifest


def upload_dir(local_dir: Path, dest: Location | str | Path, extra: dict | None = None) -> dict:
    """Copy ``local_dir`` to ``dest`` and commit it: files first, ``manifest.json`` last.

    Leftovers of an interrupted earlier upload to ``dest`` are removed first; a committed
    ``dest`` is never overwritten.

    Args:
        local_dir: the directory to upload (its own manifest.json, if any, is not copied).
        dest: the destination directory.
        extra: more keys for the manifest (e.g. step, world size).

    Raises:
        CrucibleError: ``local_dir`` is not a directory or ``dest`` is already committed.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise CrucibleError(f"{src} is not a directory; nothing to upload")
    loc = location(dest)
    if read_manifest(loc) is not None:
        raise CrucibleError(f"{loc.uri} is already committed; upload to a new location")
    loc.rmtree()
    loc.mkdirs()
    files = {
        p.relative_to(src).as_posix(): (loc / p.relative_to(src).as_posix()).upload(p)
        for p in sorted(q for q in src.rglob("*") if q.is_file() and q.name != MANIFEST)
    }
    return write_manifest(loc, files, **(extra or {}))


def download_dir(src: Location | str | Path, local_dir: Path) -> dict:
    """Copy a committed directory to ``local_dir``, checking every file's size and sha256.

    Files land in ``<local_dir>.partial`` and it is renamed to ``local_dir`` only when all
    match, so a failed download never leaves a directory that looks complete.

    Args:
        src: the committed directory.
        local_dir: where to put it (must not exist).

    Raises:
        CrucibleError: ``src`` is not committed, a file is missing or corrupt, or
            ``local_dir`` exists.
    """
    loc = location(src)
    manifest = read_manifest(loc)
    if manifest is None:
        raise CrucibleError(f"{loc.uri} has no {MANIFEST}: it is not a committed directory")
    dest = Path(local_dir)
    if dest.exists():
        raise CrucibleError(f"{dest} exists; download into a new directory")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, meta in manifest["files"].items():
            (loc / rel).download(tmp / rel, meta["sha256"], int(meta["bytes"]))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
