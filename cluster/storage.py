"""Run storage on local/NFS paths and S3-compatible object stores, through ``pyarrow.fs``.

A directory (training shards, a checkpoint) is *committed* by writing ``manifest.json``
last: it lists every file with its size and sha256. Object stores have no directory rename,
but a single PUT is atomic, so a prefix without a manifest is an interrupted upload and is
never considered complete, listed, or chosen as the latest. On local filesystems the
manifest is written to a temporary name and renamed into place, the same guarantee.

URIs: a plain path (local disk or an NFS mount), ``file:///...``, or ``s3://bucket/prefix``.
S3 credentials come from the usual AWS environment/config chain; the endpoint of an
S3-compatible store (MinIO, Ceph, moto) from ``endpoint_url`` or ``$AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from crucible.errors import CrucibleError

MANIFEST = "manifest.json"
_CHUNK = 8 << 20
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Location:
    """A directory on some filesystem: the filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def child(self, name: str) -> Location:
        """The location ``name`` below this one.

        Args:
            name: a relative POSIX path.
        """
        return Location(
            self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}"
        )

    @property
    def is_object_store(self) -> bool:
        """True for S3 (no atomic directory rename)."""
        return self.fs.type_name == "s3"


def open_location(uri: str | Path, endpoint_url: str | None = None) -> Location:
    """Resolve a path or URI to a :class:`Location`.

    Args:
        uri: a local/NFS path, ``file://`` URI or ``s3://bucket/prefix``.
        endpoint_url: S3-compatible endpoint, e.g. ``http://127.0.0.1:9000`` (default:
            ``$AWS_ENDPOINT_URL``, else AWS).

    Raises:
        CrucibleError: an unsupported scheme or an S3 URI without a bucket.
    """
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        local = Path(parsed.path if parsed.scheme else text).expanduser().absolute()
        return Location(pafs.LocalFileSystem(), local.as_posix(), local.as_posix())
    if parsed.scheme != "s3":
        raise CrucibleError(f"storage {text!r}: use a local/NFS path or s3://bucket/prefix")
    if not parsed.netloc:
        raise CrucibleError(f"storage {text!r} has no bucket; write s3://bucket/prefix")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs |= {"endpoint_override": ep.netloc, "scheme": ep.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    fs = pafs.S3FileSystem(**kwargs)
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return Location(fs, path, f"s3://{path}")


def _as_location(where: Location | str | Path, endpoint_url: str | None) -> Location:
    return where if isinstance(where, Location) else open_location(where, endpoint_url)


def _files(loc: Location) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``loc`` (empty if it does not exist)."""
    sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    base = loc.path.rstrip("/") + "/"
    return {
        info.path[len(base) :]: info.size or 0
        for info in loc.fs.get_file_info(sel)
        if info.type == pafs.FileType.File
    }


def read_manifest(where: Location | str | Path, endpoint_url: str | None = None) -> dict | None:
    """The manifest of a committed directory, or None if it has none (not committed).

    Args:
        where: the directory.
        endpoint_url: S3-compatible endpoint.
    """
    loc = _as_location(where, endpoint_url)
    target = loc.child(MANIFEST)
    if loc.fs.get_file_info(target.path).type != pafs.FileType.File:
        return None
    with loc.fs.open_input_stream(target.path) as f:
        try:
            data = json.loads(f.read())
        except ValueError:
            return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _write_manifest(loc: Location, manifest: dict) -> None:
    blob = json.dumps(manifest, indent=1, sort_keys=True).encode()
    target = loc.child(MANIFEST)
    if loc.is_object_store:
        with loc.fs.open_output_stream(target.path) as out:  # one PUT: atomic
            out.write(blob)
        return
    tmp = loc.child(MANIFEST + ".tmp")
    with loc.fs.open_output_stream(tmp.path) as out:
        out.write(blob)
    loc.fs.move(tmp.path, target.path)


def upload_dir(
    local_dir: Path,
    dest: Location | str | Path,
    endpoint_url: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Copy ``local_dir`` to ``dest`` and commit it: files first, ``manifest.json`` last.

    Leftovers of an interrupted earlier upload to ``dest`` are removed first; a committed
    ``dest`` is never overwritten.

    Args:
        local_dir: the directory to upload (its own manifest.json, if any, is replaced).
        dest: the destination directory.
        endpoint_url: S3-compatible endpoint.
        extra: more keys for the manifest (e.g. step, world size).

    Raises:
        CrucibleError: ``local_dir`` is not a directory or ``dest`` is already committed.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise CrucibleError(f"{src} is not a directory; nothing to upload")
    loc = _as_location(dest, endpoint_url)
    if read_manifest(loc) is not None:
        raise CrucibleError(f"{loc.uri} is already committed; upload to a new location")
    if _files(loc):
        loc.fs.delete_dir_contents(loc.path, missing_dir_ok=True)
    loc.fs.create_dir(loc.path, recursive=True)
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(q for q in src.rglob("*") if q.is_file() and q.name != MANIFEST):
        rel = p.relative_to(src).as_posix()
        if not loc.is_object_store and "/" in rel:
            loc.fs.create_dir(loc.child(rel.rsplit("/", 1)[0]).path, recursive=True)
        h = hashlib.sha256()
        with p.open("rb") as f, loc.fs.open_output_stream(loc.child(rel).path) as out:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        files[rel] = {"sha256": h.hexdigest(), "bytes": p.stat().st_size}
    manifest = (extra or {}) | {
        "created": time.time(),
        "total_bytes": sum(v["bytes"] for v in files.values()),
        "files": files,
    }
    _write_manifest(loc, manifest)
    return manifest


def verify_dir(
    where: Location | str | Path, deep: bool = False, endpoint_url: str | None = None
) -> list[str]:
    """Problems of a directory against its manifest (empty list: complete and intact).

    Args:
        where: the directory.
        deep: also re-hash every file (reads all bytes); otherwise sizes only.
        endpoint_url: S3-compatible endpoint.
    """
    loc = _as_location(where, endpoint_url)
    manifest = read_manifest(loc)
    if manifest is None:
        return [f"{loc.uri} has no {MANIFEST}: not committed (an interrupted upload)"]
    present = _files(loc)
    problems = []
    for rel, meta in manifest["files"].items():
        if rel not in present:
            problems.append(f"{rel} is missing")
        elif present[rel] != meta["bytes"]:
            problems.append(f"{rel} has {present[rel]} bytes, the manifest says {meta['bytes']}")
        elif deep and _sha256(loc, rel) != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def _sha256(loc: Location, rel: str) -> str:
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.child(rel).path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_dir(
    src: Location | str | Path, local_dir: Path, endpoint_url: str | None = None
) -> dict:
    """Copy a committed directory to ``local_dir``, checking every file's sha256.

    Files land in ``<local_dir>.partial`` and are renamed to ``local_dir`` only when all
    match, so a failed download never leaves a directory that looks complete.

    Args:
        src: the committed directory.
        local_dir: where to put it (must not exist).
        endpoint_url: S3-compatible endpoint.

    Raises:
        CrucibleError: ``src`` is not committed, a file is missing or corrupt, or
            ``local_dir`` exists.
    """
    loc = _as_location(src, endpoint_url)
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
            out_path = tmp / rel
            out_path.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            try:
                with loc.fs.open_input_stream(loc.child(rel).path) as f, out_path.open("wb") as o:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        o.write(chunk)
            except FileNotFoundError:
                raise CrucibleError(
                    f"{loc.uri}: {rel} is listed in the manifest but missing"
                ) from None
            if h.hexdigest() != meta["sha256"]:
                raise CrucibleError(f"{loc.uri}: {rel} does not match its sha256; not used")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def committed_steps(root: Location | str | Path, endpoint_url: str | None = None) -> list[int]:
    """Steps of the committed ``step-<N>`` directories under ``root``, ascending.

    A ``step-<N>`` prefix without a manifest (an interrupted upload) is left out.

    Args:
        root: the checkpoints directory.
        endpoint_url: S3-compatible endpoint.
    """
    loc = _as_location(root, endpoint_url)
    sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
    steps = []
    for info in loc.fs.get_file_info(sel):
        m = _STEP.match(info.base_name)
        if m and info.type == pafs.FileType.Directory and read_manifest(loc.child(info.base_name)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(root: Location | str | Path, endpoint_url: str | None = None) -> int | None:
    """The newest committed step under ``root``, or None.

    Args:
        root: the checkpoints directory.
        endpoint_url: S3-compatible endpoint.
    """
    steps = committed_steps(root, endpoint_url)
    return steps[-1] if steps else None
