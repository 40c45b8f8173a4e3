"""End to end with the in-process executor: outputs, stats, resume, kill-and-rerun."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stats_report import format_stats
from crucible.errors import CrucibleError


def digest(run_dir: Path) -> str:
    h = hashlib.sha256()
    for sub in ("documents", "exclusions"):
        for f in sorted((run_dir / sub).glob("part-*.parquet")):
            t = pq.read_table(f)
            h.update(f.name.encode())
            h.update(json.dumps(t.to_pylist(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def test_local_run_outputs(corpus: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    stats = run_pipeline(
        DataSpec(inputs=[str(corpus["dir"])]), run, executor="local", progress=False
    )
    docs = pq.read_table(sorted((run / "documents").glob("part-*.parquet")))
    assert docs.schema.names == [
        *("id", "text", "source", "url", "language", "language_score"),
        "metadata",  # the WARC file's headers (the JSONL files have only id, text, url)
    ]
    assert (run / "documents" / "_SUCCESS").exists()
    ids = docs.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == stats["totals"]["docs_out"] > 0
    # no planted exact duplicate survives beside its original
    texts = docs.column("text").to_pylist()
    assert len(texts) == len(set(texts))
    assert set(docs.column("language").to_pylist()) == {"en"}
    exc = pq.read_table(sorted((run / "exclusions").glob("part-*.parquet")))
    rules = set(exc.column("rule").to_pylist())
    assert {"read/bad_json", "read/missing_text", "read/non_html", "exact_dedup/duplicate"} <= rules
    assert "minhash_dedup/duplicate" in rules and "language/other_language" in rules
    # every document read is either kept or excluded with a rule
    s = stats["steps"]
    assert s["read"]["docs_in"] == stats["totals"]["docs_out"] + exc.num_rows
    assert stats["duplicate_clusters"] and stats["languages"]["en"] > 0
    report = format_stats(run)
    assert "minhash_dedup" in report and "languages: en" in report


def test_rerun_of_finished_run_does_nothing(corpus: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    spec = DataSpec(inputs=[str(corpus["dir"])])
    run_pipeline(spec, run, executor="local", progress=False)
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}
    run_pipeline(spec, run, executor="local", progress=False)
    after = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}
    assert before == after
    other = DataSpec(inputs=[str(corpus["dir"])], language={"keep": None})
    with pytest.raises(CrucibleError, match="different spec"):
        run_pipeline(other, run, executor="local", progress=False)


def test_unwritable_output_is_a_clear_error(corpus: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CrucibleError, match="cannot write"):
        run_pipeline(DataSpec(inputs=[str(corpus["dir"])]), blocker / "run", executor="local")
    with pytest.raises(CrucibleError, match="matches no file"):
        run_pipeline(DataSpec(inputs=[str(tmp_path / "none.jsonl")]), tmp_path / "r", "local")


SCRIPT = """
import os, signal, sys
from pathlib import Path
from crucible.cluster import storage
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.spec import DataSpec
when, target = sys.argv[3].split(":", 1)
write_json = storage.Location.write_json
def write_then_die(self, obj, *args, **kwargs):
    hit = str(self.path).endswith(target)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(self, obj, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
storage.Location.write_json = write_then_die
run_pipeline(DataSpec(inputs=[sys.argv[1]], reader={"batch_size": 20}), Path(sys.argv[2]),
             executor="local", progress=False)
"""

# Each kill lands at a point of the run's own progress (a marker about to be or just written),
# and each rerun resumes from what the kills before it left.
KILLS = (
    "after:filter_done/part-00001.json",  # two parts filtered
    "before:dedup/minhash.json",  # the fuzzy result written, never committed
    "after:final_done/part-00000.json",  # one part finalised
    "before:documents/_SUCCESS",  # stats written, the run not marked done
)


@pytest.mark.slow
def test_killed_and_rerun_gives_identical_output(corpus: dict[str, Any], tmp_path: Path) -> None:
    spec = DataSpec(inputs=[str(corpus["dir"])], reader={"batch_size": 20})
    clean = tmp_path / "clean"
    run_pipeline(spec, clean, executor="local", progress=False)
    killed = tmp_path / "killed"
    work = killed / "_work"
    for kill in KILLS:
        cmd = [sys.executable, "-c", SCRIPT, str(corpus["dir"]), str(killed), kill]
        assert subprocess.run(cmd, check=False).returncode == -signal.SIGKILL, kill
        if kill.startswith("after:filter_done"):
            assert sorted(p.name for p in (work / "filter_done").iterdir()) == [
                "part-00000.json",
                "part-00001.json",
            ]
            filtered = {p: p.stat().st_mtime_ns for p in (work / "filter_done").iterdir()}
        if kill.startswith("before:dedup/minhash"):
            assert [p.name for p in (work / "dedup").glob("minhash-*")]  # uncommitted result
            assert not (work / "dedup" / "minhash.json").exists()
        assert not (killed / "documents" / "_SUCCESS").exists()
    run_pipeline(spec, killed, executor="local", progress=False)
    # the parts filtered before the first kill were never filtered again
    assert {p: p.stat().st_mtime_ns for p in filtered} == filtered
    assert len(list((work / "dedup").glob("minhash-*"))) == 1  # the leftover was removed
    assert digest(killed) == digest(clean)
    a = json.loads((clean / "stats.json").read_text())
    b = json.loads((killed / "stats.json").read_text())
    assert a["steps"] == b["steps"] and a["drops"] == b["drops"]
