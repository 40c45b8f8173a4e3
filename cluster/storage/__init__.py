"""The storage layer: every artefact of a run lives under a URI, reached through ``pyarrow.fs``.

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

Modules: :mod:`.location` (:class:`Location`, :class:`PendingFile`), :mod:`.uri` (resolving
paths and URIs, checking storage, its errors), :mod:`.manifest` (the commit protocol),
:mod:`.jsonl` (append-only logs), :mod:`.files` (node-local files: sha256, atomic writes,
scratch).
"""

from crucible.cluster.storage.files import (
    CHUNK,
    cache_key,
    fsync_path,
    scratch_dir,
    sha256_file,
    write_atomic,
    write_json_file,
)
from crucible.cluster.storage.jsonl import JsonlLog, read_jsonl, read_lines
from crucible.cluster.storage.location import Location, PendingFile
from crucible.cluster.storage.manifest import (
    MANIFEST,
    download_dir,
    read_manifest,
    upload_dir,
    write_manifest,
)
from crucible.cluster.storage.uri import (
    URI_SCHEMES,
    check_storage,
    check_uri,
    describe_error,
    location,
    s3_endpoint,
)

__all__ = [
    "CHUNK",
    "MANIFEST",
    "URI_SCHEMES",
    "JsonlLog",
    "Location",
    "PendingFile",
    "cache_key",
    "check_storage",
    "check_uri",
    "describe_error",
    "download_dir",
    "fsync_path",
    "location",
    "read_jsonl",
    "read_lines",
    "read_manifest",
    "s3_endpoint",
    "scratch_dir",
    "sha256_file",
    "upload_dir",
    "write_atomic",
    "write_json_file",
    "write_manifest",
]
