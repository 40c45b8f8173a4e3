r"""Paths and URIs to :class:`~crucible.cluster.storage.location.Location`\ s, the S3
endpoint, and storage errors as one line that says what to do."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from crucible.cluster.storage.location import Location
from crucible.errors import CrucibleError


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
