"""The data job end to end through the CLI and the Ray Jobs API on the session cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from crucible.data_pipeline.sample import generate_corpus


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crucible", *args],
        capture_output=True, text=True, cwd=cwd, env=dict(os.environ), timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_data_run_on_the_cluster(tmp_path: Path, cluster_env: Path) -> None:
    generate_corpus(tmp_path / "corpus", n_docs=150, seed=3, files=2)
    spec = {
        "kind": "data",
        "name": "jobtest",
        "cluster": {"storage": "runs"},  # relative: resolved against the submitting CWD
        "data": {
            "inputs": ["corpus"],
            "shards": {"tokenizer": {"train": {"vocab_size": 300}}, "seq_len": 32},
        },
    }
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(spec))

    r = cli("data", "run", "d.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted job crucible-jobtest-0-" in r.stdout
    assert "SUCCEEDED" in r.stdout
    run = tmp_path / "runs" / "jobtest"
    resolved = yaml.safe_load((run / "spec.resolved.yaml").read_text())
    assert resolved["data"]["inputs"] == [str(tmp_path / "corpus")]
    docs = pq.read_table(sorted((run / "documents").glob("*.parquet"))).num_rows
    stats = json.loads((run / "stats.json").read_text())
    assert 0 < docs < 150
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["seq_len"] == 32

    r = cli("data", "stats", "jobtest", "--storage", "runs", cwd=tmp_path)
    assert r.returncode == 0 and "minhash" in r.stdout.lower(), r.stdout + r.stderr
    r = cli("jobs", "list", cwd=tmp_path)
    assert r.returncode == 0 and "jobtest" in r.stdout

    # Same spec again: the finished run does nothing new (same stats, same documents).
    r = cli("data", "run", "d.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((run / "stats.json").read_text()) == stats

    # A different spec under the same name is refused, one line, nothing submitted.
    r = cli("data", "run", "d.yaml", "--set", "data.shards.seq_len=64", cwd=tmp_path)
    assert r.returncode == 2
    assert (
        r.stderr.startswith("error: run 'jobtest' already exists") and "Traceback" not in r.stderr
    )
