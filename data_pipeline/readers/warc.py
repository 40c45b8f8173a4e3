"""WARC (HTML responses, text extracted by resiliparse) and WET (extracted text) readers.

Every record's block is checked against its ``Content-Length`` and, where present, its
``WARC-Block-Digest`` (warcio's ``check_digests``): a cut or corrupt record is dropped
(``truncated_record``, ``corrupt_record``), never emitted, and the records before it are kept.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.recordloader import ArcWarcRecord
from warcio.statusandheaders import StatusAndHeadersParserException

from crucible.data_pipeline.document import Document, Exclusion
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.file_errors import file_failed
from crucible.data_pipeline.readers.files import CHUNK, ChunkStream, open_decompressed
from crucible.data_pipeline.readers.metadata import select_metadata
from crucible.data_pipeline.spec import ReaderSpec

HTML_TYPES = ("text/html", "application/xhtml+xml")
BROKEN = (
    ArchiveLoadFailed,
    StatusAndHeadersParserException,
    EOFError,
    zlib.error,
    ValueError,
    OSError,
)
HTTP_FIELDS = ("Content-Type", "Content-Language")


def html_to_text(body: bytes) -> str:
    """Main-content plain text of an HTML page (encoding detected from the bytes)."""
    html = bytes_to_str(body, detect_encoding(body) or "utf-8")
    return extract_plain_text(html, main_content=True, alt_texts=False, links=False)


def record_fields(record: ArcWarcRecord) -> list[tuple[str, Any]]:
    """A record's WARC headers (``WARC-Date`` as ``warc_date``, ...) and, for a response, its
    HTTP status, content type and language (``http_status``, ``http_content_type``, ...)."""
    fields: list[tuple[str, Any]] = [
        (name.lower().replace("-", "_"), value) for name, value in record.rec_headers.headers
    ]
    http = record.http_headers
    if http is not None and record.rec_type == "response":
        code = http.get_statuscode()
        fields.append(("http_status", int(code) if code and code.isdigit() else code))
        fields += [(f"http_{h.lower().replace('-', '_')}", http.get_header(h)) for h in HTTP_FIELDS]
    return fields


def check_record(record: ArcWarcRecord, stats: StepStats) -> str | None:
    """Read the rest of ``record``'s block; the rule it breaks (``truncated_record``: fewer
    bytes than its Content-Length; ``corrupt_record``: its block digest differs), or None.
    A payload digest that differs is only counted (``payload_digest_mismatch``): payload
    digests of some crawlers cover the transfer-decoded body."""
    while record.raw_stream.read(CHUNK):
        pass
    if getattr(record.raw_stream, "limit", 0) > 0:
        return "truncated_record"
    problems = record.digest_checker.problems
    if any(p.startswith("block digest failed") for p in problems):
        return "corrupt_record"
    if any(p.startswith("payload digest failed") for p in problems):
        stats.counters["payload_digest_mismatch"] += 1
    return None


def read_warc(
    path: str,
    spec: ReaderSpec,
    stats: StepStats,
    exclusions: list[Exclusion],
    wet: bool = False,
    compression: str | None = None,
) -> Iterator[Document]:
    """Documents of a WARC (``wet=False``: HTML responses) or WET (``wet=True``) file.

    Args:
        path: the file.
        spec: size limit and the metadata to keep.
        stats: the reader's counters.
        exclusions: where non-HTML, cut, corrupt or empty records are recorded.
        wet: read ``conversion`` records (WET) instead of ``response`` records (WARC).
        compression: ``gzip``, ``zstd`` or None, as detected from the content.
    """

    def bad(rid: str, rule: str) -> None:
        stats.dropped[rule] += 1
        exclusions.append(Exclusion(rid, path, f"read/{rule}"))

    wanted = "conversion" if wet else "response"
    # decompressing ourselves (not in warcio) is what detects and counts a truncated .gz
    with open_decompressed(path, stats, compression) as f:
        records = ArchiveIterator(f, arc2warc=True, check_digests=True)
        while True:
            try:
                record = next(records)
            except StopIteration:
                # warcio ends quietly on a record cut inside its headers: bytes after the
                # last whole record are that record
                if isinstance(f.raw, ChunkStream) and f.raw.total > records.offset:
                    bad(f"{path}#{records.offset}", "truncated_record")
                break
            except BROKEN as e:
                # warcio cannot resynchronise after a broken header: what was read so far is
                # kept, the rest of the file is lost (file-level, documents unknown).
                why = f"unreadable WARC record at byte {records.offset} ({e}); rest skipped"
                file_failed(stats, path, "corrupt", why)
                break
            if record.rec_type != wanted:
                stats.counters[f"skipped_{record.rec_type}_records"] += 1
                continue
            rid = record.rec_headers.get_header("WARC-Record-ID") or f"{path}#{records.offset}"
            url = record.rec_headers.get_header("WARC-Target-URI")
            if record.length is None:
                # headers cut before their Content-Length: warcio would take the rest of the
                # stream as the block, so this is the last record either way
                bad(rid, "truncated_record")
                break
            if not wet:
                ctype = (
                    (record.http_headers.get_header("Content-Type") or "").lower()
                    if (record.http_headers)
                    else ""
                )
                if not ctype.startswith(HTML_TYPES):
                    bad(rid, "non_html")
                    continue
            if record.length > spec.max_doc_bytes:
                bad(rid, "too_large")
                continue
            try:
                body: bytes | None = record.content_stream().read()
            except Exception:
                body = None
            try:
                rule = check_record(record, stats)
            except BROKEN:
                rule = "truncated_record"
            if rule is not None or body is None:
                bad(rid, rule or "broken_record")
                continue
            if wet:
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError:
                    stats.counters["invalid_utf8_records"] += 1
                    text = body.decode("utf-8", "replace")
            else:
                try:
                    text = html_to_text(body)
                except Exception:
                    bad(rid, "extract_failed")
                    continue
            if not text or not text.strip():
                bad(rid, "empty_text")
                continue
            yield Document(
                id=rid,
                text=text,
                source=path,
                url=url,
                nbytes=len(text.encode("utf-8", "replace")),
                metadata=select_metadata(record_fields(record), spec),
            )
