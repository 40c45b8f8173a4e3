"""Record integrity: a WARC/WET record is checked against its Content-Length and block digest;
a cut or corrupt record is dropped, counted and named, and the records before it are kept."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from crucible.data_pipeline.document import InputFile
from crucible.data_pipeline.readers.read import Reader
from crucible.data_pipeline.spec import ReaderSpec

TEXTS = [f"Record number {i} has a body of plain text. " * 20 for i in range(4)]


def read(path: Path) -> tuple[list, Reader]:
    r = Reader(ReaderSpec())
    return list(r.run([InputFile(0, str(path))])), r


def wet(gz: bool = False) -> bytes:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    for i, text in enumerate(TEXTS):
        rec = w.create_warc_record(
            f"https://example.com/{i}",
            "conversion",
            payload=io.BytesIO(text.encode()),
            warc_content_type="text/plain",
            warc_headers_dict={"WARC-Record-ID": f"<urn:rec:{i}>"},
        )
        w.write_record(rec)
    return buf.getvalue()


def warc(gz: bool = False) -> bytes:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    for i, text in enumerate(TEXTS):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        html = f"<html><body><article><p>{text}</p></article></body></html>".encode()
        rec = w.create_warc_record(
            f"https://example.com/{i}",
            "response",
            payload=io.BytesIO(html),
            http_headers=http,
            warc_headers_dict={"WARC-Record-ID": f"<urn:rec:{i}>"},
        )
        w.write_record(rec)
    return buf.getvalue()


def cut_in_last_body(blob: bytes) -> bytes:
    """``blob`` cut 40 bytes into the last record's text."""
    return blob[: blob.rindex(b"Record number 3") + 40]


def assert_first_three_kept(docs: list, r: Reader) -> None:
    assert [d.id for d in docs] == ["<urn:rec:0>", "<urn:rec:1>", "<urn:rec:2>"]
    assert all(TEXTS[i].strip() in d.text for i, d in enumerate(docs))
    assert r.stats.dropped == {"truncated_record": 1}
    assert [(e.id, e.rule) for e in r.exclusions] == [("<urn:rec:3>", "read/truncated_record")]
    assert r.stats.docs_in == 4 and r.stats.docs_out == 3


def test_cut_wet_record_is_dropped_and_the_ones_before_kept(tmp_path: Path) -> None:
    path = tmp_path / "cut.wet"
    path.write_bytes(cut_in_last_body(wet()))
    docs, r = read(path)
    assert_first_three_kept(docs, r)


def test_cut_warc_record_is_dropped_and_the_ones_before_kept(tmp_path: Path) -> None:
    path = tmp_path / "cut.warc"
    path.write_bytes(cut_in_last_body(warc()))
    docs, r = read(path)
    assert_first_three_kept(docs, r)


def test_cut_record_in_truncated_gzip_is_not_emitted(tmp_path: Path) -> None:
    # one gzip member per record: the cut member's partial text must not become a document
    blob = wet(gz=True)
    last = blob.rindex(b"\x1f\x8b\x08")
    path = tmp_path / "cut.wet.gz"
    path.write_bytes(blob[: last + (len(blob) - last) * 3 // 4])
    docs, r = read(path)
    assert r.stats.counters["files/truncated"] == 1
    assert_first_three_kept(docs, r)


def test_block_digest_mismatch_is_a_corrupt_record(tmp_path: Path) -> None:
    blob = bytearray(wet())
    at = blob.index(b"Record number 1") + 3
    blob[at : at + 1] = b"X"  # same length, different bytes
    path = tmp_path / "bad.wet"
    path.write_bytes(bytes(blob))
    docs, r = read(path)
    assert [d.id for d in docs] == ["<urn:rec:0>", "<urn:rec:2>", "<urn:rec:3>"]
    assert r.stats.dropped == {"corrupt_record": 1}
    assert [(e.id, e.rule) for e in r.exclusions] == [("<urn:rec:1>", "read/corrupt_record")]


def test_whole_files_have_no_drops(tmp_path: Path) -> None:
    for name, blob in (("a.wet", wet()), ("a.warc.gz", warc(gz=True))):
        (tmp_path / name).write_bytes(blob)
        docs, r = read(tmp_path / name)
        assert len(docs) == 4 and not r.stats.dropped and not r.stats.counters["files/truncated"]


def test_cut_jsonl_line_is_a_truncated_record(tmp_path: Path) -> None:
    lines = [json.dumps({"text": t}).encode() for t in TEXTS]
    blob = b"\n".join(lines)
    path = tmp_path / "cut.jsonl"
    path.write_bytes(blob[: len(blob) - 10])
    docs, r = read(path)
    assert [d.text for d in docs] == TEXTS[:3]
    assert r.stats.dropped == {"truncated_record": 1}
    # a last line without newline that parses is a document (many writers omit the newline)
    path.write_bytes(blob)
    docs, r = read(path)
    assert len(docs) == 4 and not r.stats.dropped
    # in a truncated gzip an unterminated last line is cut, even when it happens to parse
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(blob)[:-8])  # all the text, without the CRC/size trailer
    docs, r = read(path)
    assert r.stats.counters["files/truncated"] == 1
    assert [d.text for d in docs] == TEXTS[:3]
    assert r.stats.dropped == {"truncated_record": 1}
