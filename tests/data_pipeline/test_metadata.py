"""Metadata passthrough: every input field besides the text travels with its document, from
JSONL, Parquet and WARC/WET into the Parquet documents, typed consistently across parts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from crucible.data_pipeline.document import InputFile
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.readers.read import Reader
from crucible.data_pipeline.spec import DataSpec, ReaderSpec
from crucible.data_pipeline.writers.metadata import unify_kinds

TEXT = "A plain sentence about metadata that stays with its document. "


def read(path: Path, **kw: object) -> list:
    return list(Reader(ReaderSpec(**kw)).run([InputFile(0, str(path))]))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wet(path: Path) -> Path:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    rec = w.create_warc_record(
        "https://example.com/wet",
        "conversion",
        payload=io.BytesIO((TEXT * 5).encode()),
        warc_content_type="text/plain",
        warc_headers_dict={
            "WARC-Record-ID": "<urn:wet:0>",
            "WARC-Date": "2024-02-03T04:05:06Z",
            "WARC-Identified-Content-Language": "eng",
        },
    )
    w.write_record(rec)
    path.write_bytes(buf.getvalue())
    return path


def test_jsonl_fields_selected(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "a.jsonl", [{"text": TEXT, "id": 1, "url": "u", "lang": "en", "n": 3}])
    assert read(path)[0].metadata == {"lang": "en", "n": 3}
    assert read(path, metadata="none")[0].metadata is None
    assert read(path, metadata=["n"])[0].metadata == {"n": 3}


def test_warc_headers_are_metadata(tmp_path: Path) -> None:
    (doc,) = read(wet(tmp_path / "a.wet.gz"))
    m = doc.metadata
    assert m["warc_date"] == "2024-02-03T04:05:06Z" and m["warc_record_id"] == "<urn:wet:0>"
    assert m["warc_target_uri"] == "https://example.com/wet" and m["content_type"] == "text/plain"
    assert m["warc_identified_content_language"] == "eng"
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=False)
    http = StatusAndHeaders(
        "200 OK",
        [("Content-Type", "text/html"), ("Content-Language", "en-GB")],
        protocol="HTTP/1.1",
    )
    html = f"<html><body><article><p>{TEXT}</p></article></body></html>".encode()
    w.write_record(
        w.create_warc_record("https://x/", "response", payload=io.BytesIO(html), http_headers=http)
    )
    (tmp_path / "b.warc").write_bytes(buf.getvalue())
    (doc,) = read(tmp_path / "b.warc")
    assert doc.metadata["http_content_type"] == "text/html"
    assert doc.metadata["http_content_language"] == "en-GB"
    assert doc.metadata["http_status"] == 200 and doc.metadata["warc_type"] == "response"


def test_unify_kinds() -> None:
    kinds = {"a": {"int"}, "b": {"int", "float"}, "c": {"string", "int"}, "d": {"json"}}
    assert unify_kinds(kinds) == {"a": "int", "b": "float", "c": "json", "d": "json"}


@pytest.fixture
def bare_spec() -> dict:
    """Every document step and dedup off: what is read is what is written."""
    off = {"enabled": False}
    return {
        k: off for k in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii")
    } | {"dedup": {"exact": off, "minhash": off}}


def test_metadata_round_trip_into_documents(tmp_path: Path, bare_spec: dict) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    # the files disagree: score is an int in one file and a string in another, n an int and a
    # float; tags is an array; only one file has lang; the last has no metadata at all
    jsonl(inp / "a.jsonl", [{"text": TEXT + "a", "score": 3, "n": 1, "tags": ["x", "y"]}])
    jsonl(inp / "b.jsonl", [{"text": TEXT + "b", "score": "high", "n": 2.5, "lang": "en"}])
    jsonl(inp / "c.jsonl", [{"text": TEXT + "c"}])
    pq.write_table(pa.table({"text": [TEXT + "p"], "year": [2021]}), inp / "d.parquet")
    wet(inp / "e.wet.gz")
    run = tmp_path / "run"
    run_pipeline(DataSpec(inputs=[str(inp)], **bare_spec), run, executor="local", progress=False)
    files = sorted((run / "documents").glob("part-*.parquet"))
    schemas = {pq.read_schema(f) for f in files}
    assert len(schemas) == 1  # every part has the same schema, so they read as one table
    docs = pq.read_table(files)
    meta = docs.schema.field("metadata").type
    types = {meta.field(i).name: meta.field(i).type for i in range(meta.num_fields)}
    assert types["n"] == pa.float64() and types["year"] == pa.int64()
    assert types["score"] == pa.string() and types["warc_date"] == pa.string()
    assert meta.field("score").metadata == {b"encoding": b"json"}
    rows = {r["text"][-1]: r["metadata"] for r in docs.to_pylist()}
    assert rows["a"]["score"] == "3" and rows["b"]["score"] == '"high"'
    assert rows["a"]["n"] == 1.0 and rows["b"]["n"] == 2.5
    assert json.loads(rows["a"]["tags"]) == ["x", "y"] and rows["b"]["lang"] == "en"
    assert rows["c"] is None and rows["p"]["year"] == 2021
    wet_row = next(m for t, m in rows.items() if t not in "abcp")
    assert wet_row["warc_date"] == "2024-02-03T04:05:06Z"
    assert wet_row["warc_identified_content_language"] == "eng"
    # the intermediate (filtered) documents carry the fields too
    filtered = pq.read_table(sorted((run / "_work" / "filtered").glob("part-*.parquet")))
    assert {"score": 3, "n": 1, "tags": ["x", "y"]} in [
        json.loads(m) for m in filtered.column("metadata").to_pylist() if m
    ]


def test_metadata_none_writes_no_column(tmp_path: Path, bare_spec: dict) -> None:
    jsonl(tmp_path / "a.jsonl", [{"text": TEXT, "score": 3}])
    spec = DataSpec(inputs=[str(tmp_path / "a.jsonl")], reader={"metadata": "none"}, **bare_spec)
    run_pipeline(spec, tmp_path / "run", executor="local", progress=False)
    docs = pq.read_table(sorted((tmp_path / "run" / "documents").glob("part-*.parquet")))
    assert "metadata" not in docs.schema.names and docs.num_rows == 1
