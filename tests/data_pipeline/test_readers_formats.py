"""Formats by content: compression and container come from the bytes, a name that disagrees is
a warning, not a loss; failures of whole files are counted as files, with capped warnings."""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from crucible.data_pipeline.document import InputFile
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers import file_errors
from crucible.data_pipeline.readers.read import Reader
from crucible.data_pipeline.spec import ReaderSpec

BODY = b"\n".join(json.dumps({"text": f"document {i}"}).encode() for i in range(50)) + b"\n"


def read(path: Path) -> tuple[list, Reader]:
    r = Reader(ReaderSpec())
    return list(r.run([InputFile(0, str(path))])), r


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_errors, "_shown", 0)


@pytest.mark.parametrize(
    ("name", "blob"),
    [
        ("gz-named-plain.jsonl", gzip.compress(BODY)),
        ("zstd-named-gzip.jsonl.gz", zstandard.ZstdCompressor().compress(BODY)),
        ("plain-named-zstd.jsonl.zst", BODY),
    ],
)
def test_compression_from_content_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, blob: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(blob)
    with caplog.at_level(logging.WARNING):
        docs, r = read(path)
    assert [d.text for d in docs] == [f"document {i}" for i in range(50)]
    assert not r.stats.dropped and r.stats.counters["format_mismatch"] == 1
    assert name in caplog.text and "named as" in caplog.text


def test_parquet_and_warc_by_content(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", "two"]}), sink)
    (tmp_path / "table.jsonl").write_bytes(sink.getvalue())
    docs, r = read(tmp_path / "table.jsonl")
    assert [d.text for d in docs] == ["one", "two"] and r.stats.counters["format_mismatch"] == 1
    # a name that matches its content is read silently
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(BODY))
    caplog.clear()
    docs, r = read(tmp_path / "ok.jsonl.gz")
    assert len(docs) == 50 and not r.stats.counters["format_mismatch"] and not caplog.text


def test_corrupt_files_counted_as_files_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blob = bytearray(gzip.compress(BODY * 200))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(blob))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not a parquet file")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    r = Reader(ReaderSpec())
    with caplog.at_level(logging.WARNING):
        docs = list(
            r.run(
                [
                    InputFile(i, str(tmp_path / n))
                    for i, n in enumerate(["bad.jsonl.gz", "bad.parquet", "empty.jsonl"])
                ]
            )
        )
    c = r.stats.counters
    assert (c["files"], c["files/corrupt"], c["files/empty"]) == (3, 2, 1)
    # files are not documents: every read document is kept or dropped by a named rule
    assert r.stats.docs_in == len(docs) + sum(r.stats.dropped.values())
    assert all(e.rule != "read/empty_file" for e in r.exclusions)
    for name in ("bad.jsonl.gz", "bad.parquet", "empty.jsonl"):
        assert name in caplog.text


def test_file_warnings_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    stats = StepStats()
    with caplog.at_level(logging.WARNING):
        for i in range(file_errors.MAX_WARNINGS + 30):
            file_errors.file_failed(stats, f"f{i}", "corrupt", "broken")
    assert stats.counters["files/corrupt"] == file_errors.MAX_WARNINGS + 30
    assert len(caplog.records) == file_errors.MAX_WARNINGS + 1
    assert "not shown" in caplog.records[-1].getMessage()
