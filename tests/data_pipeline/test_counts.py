"""Honest counts: duplicates name what they duplicate, disabled steps have no stats row,
normalisation counts what it removes, the report shows file failures apart from drops."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.normalize import Normalize
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.spec import DataSpec, NormalizeSpec
from crucible.data_pipeline.stats_report import format_stats

NO_FILTERS = {
    k: {"enabled": False}
    for k in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii")
}


def words(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(n)]


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))


def exclusions(run: Path) -> list[dict[str, Any]]:
    return pq.read_table(sorted((run / "exclusions").glob("part-*.parquet"))).to_pylist()


def test_every_duplicate_names_the_document_it_duplicates(tmp_path: Path) -> None:
    base, other = words(1), words(2)
    near = list(base)
    near[150] = "changed"
    (tmp_path / "in").mkdir()
    # the survivors are read first (part 0); their duplicates are in another part
    write_jsonl(tmp_path / "in" / "a.jsonl", [("root", " ".join(base)), ("o", " ".join(other))])
    write_jsonl(
        tmp_path / "in" / "b.jsonl",
        [("copy", " ".join(other)), ("near", " ".join(near)), ("copy2", " ".join(base))],
    )
    spec = DataSpec.model_validate({"inputs": [str(tmp_path / "in")], **NO_FILTERS})
    run = tmp_path / "run"
    run_pipeline(spec, run, executor="local", progress=False)
    dups = {r["id"]: (r["rule"], r["duplicate_of"]) for r in exclusions(run)}
    assert dups == {
        "copy": ("exact_dedup/duplicate", "o"),
        "copy2": ("exact_dedup/duplicate", "root"),
        "near": ("minhash_dedup/duplicate", "root"),
    }


def test_duplicates_of_the_generated_corpus_name_kept_documents(
    corpus: dict[str, Any], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run_pipeline(DataSpec(inputs=[str(corpus["dir"])]), run, executor="local", progress=False)
    docs = pq.read_table(sorted((run / "documents").glob("part-*.parquet")))
    kept = set(docs.column("id").to_pylist())
    rows = exclusions(run)
    dups = [r for r in rows if r["rule"].endswith("dedup/duplicate")]
    assert dups and [r["id"] for r in dups if r["duplicate_of"] not in kept] == []
    assert all(r["duplicate_of"] is None for r in rows if r not in dups)
    truth = {d: of for d, of in corpus["exact_dups"]}
    exact = {r["id"]: r["duplicate_of"] for r in dups if r["rule"] == "exact_dedup/duplicate"}
    assert any(exact.get(d) == of for d, of in truth.items())


def test_disabled_steps_have_no_stats_rows(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [("a", " ".join(words(1))), ("b", "x y z")])
    spec = DataSpec.model_validate(
        {
            "inputs": [str(tmp_path / "in")],
            **NO_FILTERS,
            "dedup": {"exact": {"enabled": False}, "minhash": {"enabled": False}},
        }
    )
    stats = run_pipeline(spec, tmp_path / "run", executor="local", progress=False)
    assert list(stats["steps"]) == ["read", "normalize"]
    report = format_stats(tmp_path / "run")
    assert "dedup" not in report


def test_normalize_counts_the_characters_it_removes() -> None:
    step = Normalize(NormalizeSpec())
    docs = [
        Document(id="a", text="ab\x00c\x01d\u200b", source="s"),
        Document(id="b", text="clean", source="s"),
        Document(id="c", text="\x00\x00", source="s"),  # left empty: dropped
    ]
    for d in docs:
        d.nbytes = len(d.text.encode())
    out = list(step.run(docs))
    assert [d.text for d in out] == ["abcd", "clean"]
    c = step.stats.counters
    assert c["nul_chars"] == 3
    assert c["control_chars"] == 5  # NULs, \x01 and the zero-width space, in every document
    assert c["chars_removed"] == 3 + 2  # "a": three; "c" (dropped): two


def test_report_shows_file_failures_apart_from_drops(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [("a", " ".join(words(1)))])
    (tmp_path / "in" / "b.jsonl").write_text("")  # empty file
    (tmp_path / "in" / "c.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")  # cut short
    spec = DataSpec.model_validate({"inputs": [str(tmp_path / "in")], **NO_FILTERS})
    stats = run_pipeline(spec, tmp_path / "run", executor="local", progress=False)
    counters = stats["steps"]["read"]["counters"]
    assert counters["files/empty"] == 1 and counters["files/truncated"] == 1
    report = format_stats(tmp_path / "run")
    (line,) = [x for x in report.splitlines() if "input files:" in x]
    assert "3 read; failed as a whole: 1 empty, 1 truncated" in line
    assert "files/" not in report  # not among the drops by rule
