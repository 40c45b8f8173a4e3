"""Run storage: every artefact of a run lives under a URI, reached through ``pyarrow.fs``.

A :class:`Location` is a path on some filesystem: a plain path or ``file://`` URI (local
disk, an NFS mount), ``s3://bucket/prefix`` (S3 and S3-compatible stores), or any other URI
``pyarrow.fs.FileSystem.from_uri`` understands (``gs://``, ``hdfs://``, ``abfs://``). Every
module reads and writes run files through it, so local and remote runs take one code path;
nothing does ``Path`` arithmetic on a URI.

Commit protocol (the same everywhere): a set of files is complete only once its manifest or
marker is written, last, as one object. Object stores have no directory rename, but a single
PUT is atomic: readers trust only committed manifests, never the presence of files. Where the
filesystem renames atomically (local disk, NFS), single files are still written under a
temporary name, fsynced and renamed into place (:meth:`Location.write_bytes`).

Credentials come from each store's standard provider chain (environment, profile, instance
role), never from a spec. The endpoint of an S3-compatible store (MinIO, Ceph, moto) is
``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``, the variables the AWS SDKs read
(``pyarrow`` 26 does not read them itself).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from crucible.errors import CrucibleError

MANIFEST = "manifest.json"
CHUNK = 8 << 20
_NO_RENAME = {"s3", "gcs", "abfs"}  # pyarrow's type_name of filesystems without atomic rename
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Location:
    """A file or directory on some filesystem: the filesystem, the path inside it, the URI."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __truediv__(self, name: str) -> Location:
        """The location ``name`` (a relative POSIX path) below this one."""
        name = name.strip("/")
        return Location(
            self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}"
        )

    def child(self, name: str) -> Location:
        """Same as ``self / name``."""
        return self / name

    def __str__(self) -> str:
        return self.uri

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Rebuilt from the URI where it is unpickled (a Ray task on another node): the
        # filesystem takes that node's credentials and endpoint, never the sender's.
        return (location, (self.uri,))

    @property
    def name(self) -> str:
        """The last path component."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The directory holding this location."""
        path = self.path.rstrip("/").rsplit("/", 1)[0] or "/"
        uri = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, path, uri)

    @property
    def is_local(self) -> bool:
        """True on this machine's filesystem (local disk or a mount)."""
        return self.fs.type_name == "local"

    @property
    def renames(self) -> bool:
        """Whether the filesystem renames atomically (object stores do not)."""
        return self.fs.type_name not in _NO_RENAME

    @property
    def local_path(self) -> Path:
        """This location as a local path; only for :attr:`is_local` locations."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path)

    # --- queries ------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        """pyarrow's file info (type, size) of this location."""
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        """A file or directory is here (an object-store prefix counts as a directory)."""
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        """A file is here."""
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A directory (or a non-empty object-store prefix) is here."""
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        """Size of the file in bytes."""
        info = self.info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.uri)
        return int(info.size or 0)

    def ls(self) -> list[str]:
        """Names of the entries directly under this directory, sorted (none if absent)."""
        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def walk(self) -> dict[str, int]:
        """``{relative POSIX path: size}`` of every file below this directory (empty if absent)."""
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        base = self.path.rstrip("/") + "/"
        return {
            i.path[len(base) :]: int(i.size or 0)
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File and i.path.startswith(base)
        }

    def glob(self, pattern: str) -> list[Location]:
        """Entries directly under this directory whose name matches ``pattern``, sorted."""
        return [self / n for n in self.ls() if fnmatch.fnmatchcase(n, pattern)]

    # --- whole files --------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        """The file's bytes (``FileNotFoundError`` if it is absent)."""
        with self.fs.open_input_stream(self.path, compression=None) as f:
            return f.read()

    def read_text(self) -> str:
        """The file as UTF-8 text."""
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        """The file parsed as JSON."""
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes, durable: bool = True) -> None:
        """Replace the file with ``data`` atomically: readers see the old or the new bytes.

        Object stores: one PUT. Elsewhere: a temporary sibling, fsynced (``durable``) and
        renamed into place.

        Args:
            data: the new contents.
            durable: fsync the file and its directory before returning (local filesystems).
        """
        if not self.renames:
            with self.fs.open_output_stream(self.path, compression=None) as out:
                out.write(data)
            return
        if self.is_local:
            _write_local(Path(self.path), data, durable)
            return
        tmp = self.parent / f".tmp-{uuid.uuid4().hex[:8]}-{self.name}"
        self.parent.mkdirs()
        with self.fs.open_output_stream(tmp.path, compression=None) as out:
            out.write(data)
        self.fs.move(tmp.path, self.path)

    def write_text(self, text: str, durable: bool = True) -> None:
        """Replace the file with ``text`` (UTF-8) atomically (see :meth:`write_bytes`)."""
        self.write_bytes(text.encode(), durable)

    def write_json(self, obj: Any, durable: bool = True) -> None:
        """Replace the file with ``obj`` as indented, key-sorted JSON, atomically."""
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), durable)

    # --- streams ------------------------------------------------------------------------

    def open_read(self) -> Any:
        """A seekable binary reader (``pyarrow.NativeFile``; Parquet and Arrow take it)."""
        return self.fs.open_input_file(self.path)

    def open_stream(self) -> Any:
        """A sequential binary reader (cheaper than :meth:`open_read` on object stores)."""
        return self.fs.open_input_stream(self.path, compression=None)

    def writing(self) -> PendingFile:
        """A local file to write that becomes this location, in one piece, on commit.

        Use as ``with loc.writing() as f: write(f.path)`` (committed when the block ends
        without an exception, discarded otherwise), or call :meth:`PendingFile.commit`.
        """
        return PendingFile(self)

    # --- directories --------------------------------------------------------------------

    def mkdirs(self) -> None:
        """Create this directory and its parents (nothing to do on object stores)."""
        self.fs.create_dir(self.path, recursive=True)

    def rm(self) -> None:
        """Delete the file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete the directory and everything below it, if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self.path)

    # --- transfers, with sha256 -----------------------------------------------------------

    def sha256(self) -> str:
        """Hex sha256 of the file, read in 8 MiB chunks."""
        h = hashlib.sha256()
        with self.open_stream() as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def upload(self, src: Path) -> dict[str, Any]:
        """Copy local file ``src`` here (one object on object stores); return its sha256/bytes."""
        h = hashlib.sha256()
        n = 0
        if self.is_local:
            with self.writing() as pending, open(src, "rb") as f, open(pending.path, "wb") as out:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            return {"sha256": h.hexdigest(), "bytes": n}
        self.parent.mkdirs()
        with open(src, "rb") as f, self.fs.open_output_stream(self.path, compression=None) as out:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        return {"sha256": h.hexdigest(), "bytes": n}

    def download(self, dest: Path, sha256: str | None = None, size: int | None = None) -> None:
        """Copy this file to local ``dest``, checking its size and sha256 when given.

        The bytes land in a temporary sibling renamed to ``dest`` only when they match, so
        ``dest`` is never a partial or corrupt copy.

        Raises:
            CrucibleError: the file is missing or does not match.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
        h = hashlib.sha256()
        n = 0
        try:
            try:
                with self.open_stream() as f, open(tmp, "wb") as out:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
            except FileNotFoundError:
                raise CrucibleError(f"{self.uri} is missing") from None
            if size is not None and n != size:
                raise CrucibleError(f"{self.uri} has {n} bytes, its manifest says {size}")
            if sha256 is not None and h.hexdigest() != sha256:
                raise CrucibleError(f"{self.uri} does not match its sha256")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


class PendingFile:
    """A local file being written that becomes ``loc`` only when committed.

    Local filesystems: a temporary sibling (``.tmp-<name>``: a rerun of the same writer
    replaces a killed one's leftover), fsynced and renamed into place. Elsewhere: a file in
    node-local scratch, uploaded as one object on commit; an upload that never finishes
    leaves no object.

    Args:
        loc: where the file goes.
    """

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        if loc.is_local:
            final = Path(loc.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            self.path = final.with_name(f".tmp-{final.name}")
        else:
            self.path = scratch_dir("uploads") / f"{uuid.uuid4().hex}-{loc.name}"
        self.path.unlink(missing_ok=True)

    def commit(self) -> None:
        """Publish the finished file at ``loc``."""
        try:
            if self.loc.is_local:
                _fsync(self.path)
                os.replace(self.path, self.loc.path)
                _fsync(self.path.parent)
            else:
                self.loc.upload(self.path)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the file without publishing it."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_local(path: Path, data: bytes, durable: bool) -> None:
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
        _fsync(path.parent)


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the AWS SDKs' variables, if one is set."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_uri(text: str) -> Any:
    """Parse ``text`` as a storage path or URI without touching the filesystem.

    Args:
        text: a local/NFS path or a URI.

    Raises:
        CrucibleError: an unsupported scheme, or a bucket-less object-store URI.
    """
    parsed = urlparse(text)
    if parsed.scheme and parsed.scheme not in URI_SCHEMES:
        raise CrucibleError(
            f"storage {text!r}: scheme {parsed.scheme}:// is not supported; use a local/NFS "
            f"path or one of {', '.join(s + '://' for s in URI_SCHEMES)}"
        )
    if parsed.scheme not in ("", "file", "hdfs", "viewfs") and not parsed.netloc:
        raise CrucibleError(
            f"storage {text!r} has no bucket; write {parsed.scheme}://bucket/prefix"
        )
    return parsed


def location(uri: str | Path | Location) -> Location:
    """Resolve a path or URI to a :class:`Location`.

    Args:
        uri: a local/NFS path, ``file://`` URI, ``s3://bucket/prefix`` or another URI that
            ``pyarrow.fs`` supports.

    Raises:
        CrucibleError: an unsupported scheme, or an S3 URI without a bucket.
    """
    if isinstance(uri, Location):
        return uri
    text = str(uri)
    parsed = check_uri(text)
    if parsed.scheme in ("", "file"):
        local = Path(parsed.path if parsed.scheme == "file" else text).expanduser().absolute()
        return Location(pafs.LocalFileSystem(), local.as_posix(), local.as_posix())
    if parsed.scheme == "s3":
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return Location(_s3(), path, f"s3://{path}")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise CrucibleError(
            f"storage {text!r}: {e}; use a local/NFS path, s3://bucket/prefix or another "
            "URI pyarrow.fs supports"
        ) from None
    return Location(fs, path.rstrip("/"), text.rstrip("/"))


# The AWS SDK's default of 3 s per request is shorter than a busy server takes to assemble a
# large multipart upload; the SDK then retries a CompleteMultipartUpload the first attempt
# already consumed, and the upload fails.
S3_REQUEST_TIMEOUT_S = 120.0


def _s3() -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"request_timeout": S3_REQUEST_TIMEOUT_S}
    endpoint = s3_endpoint()
    if endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs |= {"endpoint_override": ep.netloc, "scheme": ep.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


# kept for callers that name it so
open_location = location


def describe_error(loc: Location, e: BaseException) -> str:
    """One line saying what a storage error means and what to do about it.

    Args:
        loc: the location the operation was on.
        e: the exception pyarrow (or the OS) raised.
    """
    text = str(e)
    where = f"storage {loc.uri}"
    if loc.fs.type_name == "s3":
        endpoint = s3_endpoint() or "AWS"
        if "NETWORK_CONNECTION" in text or "Could not connect" in text or "resolve host" in text:
            return (
                f"{where}: cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL "
                "and the network"
            )
        if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower():
            return f"{where}: bucket {loc.path.split('/')[0]!r} does not exist; create it first"
        if "ACCESS_DENIED" in text or "AccessDenied" in text or "Forbidden" in text:
            return (
                f"{where}: access denied ({_first_line(text)}); check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE / instance role) and the bucket's policy"
            )
        if "credentials" in text.lower() or "InvalidAccessKeyId" in text:
            return (
                f"{where}: no valid credentials ({_first_line(text)}); set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role"
            )
    if isinstance(e, PermissionError):
        return f"{where}: permission denied; choose a writable path"
    if isinstance(e, FileNotFoundError):
        return f"{where}: not found"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{where}: {os.strerror(e.errno)}; choose a path it can use"
    return f"{where}: {_first_line(text)}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def check_storage(uri: str | Path | Location, write: bool = True) -> Location:
    """Resolve ``uri`` and prove it usable before any work starts; return its location.

    Reads (and, with ``write``, writes and deletes a probe object) so that an unreachable
    endpoint, a missing bucket, missing credentials or a read-only bucket is one clear
    line now instead of a traceback on the cluster later.

    Args:
        uri: the storage root or run location.
        write: also check that it can be written.

    Raises:
        CrucibleError: it cannot be used, and why.
    """
    loc = location(uri)
    try:
        if loc.fs.type_name == "s3":
            bucket = location(f"s3://{loc.path.split('/')[0]}")
            if bucket.info().type == pafs.FileType.NotFound:
                raise CrucibleError(
                    f"storage {loc.uri}: bucket {bucket.path!r} does not exist (or this "
                    "identity cannot see it); create it or fix cluster.storage"
                )
        else:
            info = loc.info()
            if info.type == pafs.FileType.File:
                raise CrucibleError(f"storage {loc.uri} is a file; it must be a directory")
        loc.ls()
    except CrucibleError:
        raise
    except (OSError, ValueError) as e:
        raise CrucibleError(describe_error(loc, e)) from None
    if write:
        try:
            if loc.is_local:
                loc.mkdirs()
            probe = loc / f".crucible-probe-{uuid.uuid4().hex[:12]}"
            probe.write_bytes(b"", durable=False)
            probe.rm()
        except (OSError, ValueError) as e:
            raise CrucibleError("cannot write to " + describe_error(loc, e)) from None
    return loc


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


# --- manifests: commit a set of files by writing their list last ----------------------------


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


def verify_dir(where: Location | str | Path, deep: bool = False) -> list[str]:
    """Problems of a directory against its manifest (empty list: complete and intact).

    Args:
        where: the directory.
        deep: also re-hash every file (reads all bytes); otherwise sizes only.
    """
    loc = location(where)
    manifest = read_manifest(loc)
    if manifest is None:
        return [f"{loc.uri} has no {MANIFEST}: not committed (an interrupted upload)"]
    present = loc.walk()
    problems = []
    for rel, meta in manifest["files"].items():
        if rel not in present:
            problems.append(f"{rel} is missing")
        elif present[rel] != meta["bytes"]:
            problems.append(f"{rel} has {present[rel]} bytes, the manifest says {meta['bytes']}")
        elif deep and (loc / rel).sha256() != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


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


def committed_steps(root: Location | str | Path) -> list[int]:
    """Steps of the committed ``step-<N>`` directories under ``root``, ascending.

    A ``step-<N>`` without a manifest (an interrupted save or upload) is left out.

    Args:
        root: the checkpoints directory.
    """
    loc = location(root)
    steps = []
    for name in loc.ls():
        m = _STEP.match(name)
        if m and (loc / name / MANIFEST).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(root: Location | str | Path) -> int | None:
    """The newest committed step under ``root``, or None.

    Args:
        root: the checkpoints directory.
    """
    steps = committed_steps(root)
    return steps[-1] if steps else None


# --- append-only logs ------------------------------------------------------------------------


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
