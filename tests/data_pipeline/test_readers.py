"""Every bad-input class is counted with its reason, and the rest of the file is still read."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from crucible.data_pipeline.document import InputFile
from crucible.data_pipeline.readers.files import expand_inputs
from crucible.data_pipeline.readers.read import Reader
from crucible.data_pipeline.sample import write_warc
from crucible.data_pipeline.spec import ReaderSpec
from crucible.errors import CrucibleError


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def lines(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"text": f"document {i}"}).encode() for i in range(start, start + n)]


def read(path: Path, **kw: object) -> tuple[list, Reader]:
    r = Reader(ReaderSpec(**kw))
    return list(r.run([InputFile(0, str(path))])), r


def test_malformed_json_and_missing_text_cost_one_line(tmp_path: Path) -> None:
    body = b"\n".join(
        [*lines(3), b'{"text": "broken', b'{"body": "no text"}', b'{"text": 5}', b"", *lines(2, 3)]
    )
    docs, r = read(write(tmp_path / "a.jsonl", body))
    assert [d.text for d in docs] == [f"document {i}" for i in range(5)]
    assert r.stats.dropped == {"bad_json": 1, "missing_text": 1, "text_not_string": 1}
    assert sorted(e.rule for e in r.exclusions) == [
        "read/bad_json",
        "read/missing_text",
        "read/text_not_string",
    ]
    # ids derive from source + byte offset, and are stable
    assert docs[0].id == f"{tmp_path / 'a.jsonl'}#0"
    assert docs[1].id == f"{tmp_path / 'a.jsonl'}#{len(lines(1)[0]) + 1}"


def test_invalid_utf8_keeps_the_line_and_the_rest(tmp_path: Path) -> None:
    bad = b'{"text": "caf\xe9 au lait"}'
    docs, r = read(write(tmp_path / "u.jsonl", b"\n".join([*lines(1), bad, *lines(1, 1)])))
    assert [d.text for d in docs] == ["document 0", "caf\ufffd au lait", "document 1"]
    assert r.stats.counters["invalid_utf8_lines"] == 1


def test_truncated_gzip_reads_what_is_there(tmp_path: Path) -> None:
    blob = gzip.compress(b"\n".join(lines(20000)) + b"\n")
    docs, r = read(write(tmp_path / "t.jsonl.gz", blob[: len(blob) // 2]))
    assert 1000 < len(docs) < 20000
    assert [d.text for d in docs[:3]] == ["document 0", "document 1", "document 2"]
    assert r.stats.counters["files/truncated"] == 1
    # the cut last line is a dropped record, not a document nor a bad_json
    assert r.stats.dropped == {"truncated_record": 1}
    assert [e.rule for e in r.exclusions] == ["read/truncated_record"]
    assert r.stats.docs_in == len(docs) + 1


def test_truncated_zstd_reads_what_is_there(tmp_path: Path) -> None:
    # several frames, as streaming writers produce: whole frames before the cut are read
    c = zstandard.ZstdCompressor()
    blob = b"".join(c.compress(b"\n".join(lines(1000, k * 1000)) + b"\n") for k in range(10))
    docs, r = read(write(tmp_path / "t.jsonl.zst", blob[: int(len(blob) * 0.55)]))
    assert 4000 <= len(docs) < 10000
    assert docs[-1].text.startswith("document")
    assert r.stats.counters["files/truncated"] == 1
    full, r2 = read(write(tmp_path / "f.jsonl.zst", blob))
    assert len(full) == 10000 and r2.stats.counters["files/truncated"] == 0


def test_empty_file_counted_as_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    docs, r = read(write(tmp_path / "e.jsonl", b""))
    assert docs == [] and r.stats.counters["files/empty"] == 1
    # a file is not a document: no drop, no exclusion, but a warning naming it
    assert not r.stats.dropped and not r.exclusions and r.stats.docs_in == 0
    assert "e.jsonl" in caplog.text and "empty" in caplog.text


def test_100mb_document(tmp_path: Path) -> None:
    big = json.dumps({"text": "a" * (100 * 1024 * 1024)}).encode()
    path = write(tmp_path / "big.jsonl", b"\n".join([lines(1)[0], big, lines(1, 1)[0]]))
    docs, r = read(path)
    assert len(docs) == 3 and len(docs[1].text) == 100 * 1024 * 1024
    docs, r = read(path, max_doc_bytes=1 << 20)
    assert [d.text for d in docs] == ["document 0", "document 1"]
    assert r.stats.dropped["too_large"] == 1


def test_warc_html_non_html_and_broken(tmp_path: Path) -> None:
    path = tmp_path / "w.warc.gz"
    write_warc(path, [("<urn:a>", "First page text.\nSecond paragraph.")], random.Random(0))
    docs, r = read(path)
    assert len(docs) == 1 and docs[0].id == "<urn:a>" and "First page text." in docs[0].text
    assert docs[0].url == "https://example.com/<urn:a>"
    assert r.stats.dropped["non_html"] == 1
    # a truncated WARC keeps the records before the break and counts the break
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for i in range(5):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        html = f"<html><body><p>Page {i} body text is here.</p></body></html>".encode()
        w.write_record(
            w.create_warc_record(
                f"https://x/{i}", "response", payload=io.BytesIO(html), http_headers=http
            )
        )
    blob = buf.getvalue()
    docs, r = read(write(tmp_path / "cut.warc.gz", blob[: int(len(blob) * 0.7)]))
    assert 1 <= len(docs) < 5
    assert r.stats.counters["files/truncated"] == 1
    assert r.stats.dropped["truncated_record"] == 1
    assert [e.rule for e in r.exclusions] == ["read/truncated_record"]
    assert all(f"Page {i} body" in d.text for i, d in enumerate(docs))
    # garbage where a record header should be: records before it are kept, the break counted
    plain = gzip.decompress(blob)
    junk = b"WARC/1.0\r\nContent-Length: abc\r\n\r\n"
    docs, r = read(write(tmp_path / "junk.warc", plain + junk + plain))
    assert 5 <= len(docs) < 10
    assert r.stats.counters["files/corrupt"] == 1 and not r.stats.dropped


def test_parquet_reader_and_bad_parquet(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"text": ["one", None, "three"], "url": ["u1", None, "u3"]}),
        tmp_path / "p.parquet",
    )
    docs, r = read(tmp_path / "p.parquet")
    assert [d.text for d in docs] == ["one", "three"] and docs[1].url == "u3"
    assert r.stats.dropped["missing_text"] == 1
    docs, r = read(write(tmp_path / "bad.parquet", b"not parquet at all"))
    assert docs == [] and r.stats.counters["files/corrupt"] == 1 and not r.stats.dropped


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CrucibleError, match="matches no file"):
        expand_inputs([str(tmp_path / "nope" / "*.jsonl")])
    write(tmp_path / "d" / "x.jsonl", b"")
    write(tmp_path / "d" / "notes.txt", b"")
    assert expand_inputs([str(tmp_path / "d")]) == [str((tmp_path / "d" / "x.jsonl").resolve())]
