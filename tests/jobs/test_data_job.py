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


def cli(*args: str, cwd: Path, columns: int = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crucible", *args],
        capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, "COLUMNS": str(columns)},
    )  # fmt: skip


@pytest.mark.slow
def test_data_run_on_the_cluster(cluster_data_run: dict, cluster_env: Path) -> None:
    tmp_path, stdout = cluster_data_run["cwd"], cluster_data_run["stdout"]
    assert "submitted job crucible-mon-data-0-" in stdout
    assert "SUCCEEDED" in stdout
    run = cluster_data_run["run"]
    resolved = yaml.safe_load((run / "spec.resolved.yaml").read_text())
    assert resolved["data"]["inputs"] == [str(tmp_path / "corpus")]
    docs = pq.read_table(sorted((run / "documents").glob("*.parquet"))).num_rows
    stats = json.loads((run / "stats.json").read_text())
    assert 0 < docs < cluster_data_run["docs"]
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["seq_len"] == 64

    r = cli("data", "stats", "mon-data", "--storage", "runs", cwd=tmp_path)
    assert r.returncode == 0 and "minhash" in r.stdout.lower(), r.stdout + r.stderr
    job_id = next(w for w in stdout.split() if w.startswith("crucible-mon-data-0-"))
    # The same cluster named by its state directory (any cluster: --address/--token-path);
    # a narrow terminal still gets whole ids, which `logs` and `stop` take.
    state_dir = str(cluster_env / "cluster")
    r = cli("jobs", "list", "--state-dir", state_dir, cwd=tmp_path, columns=60)
    assert r.returncode == 0 and job_id in r.stdout.replace("\n", "").replace("│", "")
    r = cli("jobs", "logs", job_id, "--state-dir", state_dir, cwd=tmp_path)
    assert r.returncode == 0 and "documents" in r.stdout
    # A wrong token is one line, no traceback.
    bad = tmp_path / "bad-token"
    bad.write_text("0" * 64)
    dashboard = json.loads((cluster_env / "cluster" / "cluster.json").read_text())["ports"]
    url = f"http://127.0.0.1:{dashboard['dashboard']}"
    r = cli("jobs", "list", "--address", url, "--token-path", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the auth token" in lines[0] and str(bad) in lines[0]

    # Same spec again: the finished run does nothing new (same stats, same documents).
    r = cli("data", "run", "d.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((run / "stats.json").read_text()) == stats

    # A different spec under the same name is refused, one line, nothing submitted.
    r = cli("data", "run", "d.yaml", "--set", "data.shards.seq_len=32", cwd=tmp_path)
    assert r.returncode == 2
    assert (
        r.stderr.startswith("error: run 'mon-data' already exists") and "Traceback" not in r.stderr
    )
