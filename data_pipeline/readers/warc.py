"""WARC (HTML responses, text extracted by resiliparse) and WET (extracted text) readers."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from crucible.data_pipeline.document import Document, Exclusion
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.files import open_decompressed
from crucible.data_pipeline.spec import ReaderSpec

HTML_TYPES = ("text/html", "application/xhtml+xml")


def html_to_text(body: bytes) -> str:
    """Main-content plain text of an HTML page (encoding detected from the bytes)."""
    html = bytes_to_str(body, detect_encoding(body) or "utf-8")
    return extract_plain_text(html, main_content=True, alt_texts=False, links=False)


def read_warc(
    path: str, spec: ReaderSpec, stats: StepStats, exclusions: list[Exclusion], wet: bool = False
) -> Iterator[Document]:
    """Documents of a WARC (``wet=False``: HTML responses) or WET (``wet=True``) file.

    Args:
        path: the file (``.warc``, ``.warc.gz``, ``.wet``, ``.wet.gz``).
        spec: size limit.
        stats: the reader's counters.
        exclusions: where non-HTML, broken or empty records are recorded.
        wet: read ``conversion`` records (WET) instead of ``response`` records (WARC).
    """

    def bad(rid: str, rule: str) -> None:
        stats.dropped[rule] += 1
        exclusions.append(Exclusion(rid, path, f"read/{rule}"))

    wanted = "conversion" if wet else "response"
    # decompressing ourselves (not in warcio) is what detects and counts a truncated .gz
    with open_decompressed(path, stats) as f:
        records = ArchiveIterator(f, arc2warc=True)
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except (ArchiveLoadFailed, EOFError, zlib.error, ValueError, OSError):
                # warcio cannot resynchronise after a broken header or a truncated member:
                # what was read so far is kept, the rest is counted as lost.
                bad(f"{path}#{records.offset}", "broken_warc")
                break
            if record.rec_type != wanted:
                stats.counters[f"skipped_{record.rec_type}_records"] += 1
                continue
            rid = record.rec_headers.get_header("WARC-Record-ID") or f"{path}#{records.offset}"
            url = record.rec_headers.get_header("WARC-Target-URI")
            if not wet:
                ctype = (
                    (record.http_headers.get_header("Content-Type") or "").lower()
                    if (record.http_headers)
                    else ""
                )
                if not ctype.startswith(HTML_TYPES):
                    bad(rid, "non_html")
                    continue
            try:
                body = record.content_stream().read()
            except Exception:
                bad(rid, "broken_record")
                continue
            if len(body) > spec.max_doc_bytes:
                bad(rid, "too_large")
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
                id=rid, text=text, source=path, url=url, nbytes=len(text.encode("utf-8", "replace"))
            )
