"""A file or directory on some filesystem (:class:`Location`), and a file being written
that becomes one in a single piece (:class:`PendingFile`)."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from crucible.cluster.storage.files import (
    CHUNK,
    fsync_path,
    json_bytes,
    scratch_dir,
    sha256_stream,
    write_atomic,
)
from crucible.errors import CrucibleError

_NO_RENAME = {"s3", "gcs", "abfs"}  # pyarrow's type_name of filesystems without atomic rename


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
        from crucible.cluster.storage.uri import location

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
            write_atomic(Path(self.path), data, durable)
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
        self.write_bytes(json_bytes(obj), durable)

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
        with self.open_stream() as f:
            return sha256_stream(f)

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
                fsync_path(self.path)
                os.replace(self.path, self.loc.path)
                fsync_path(self.path.parent)
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
