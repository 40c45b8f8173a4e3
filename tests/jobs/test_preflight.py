"""Checks before side effects: a spec the driver would refuse writes nothing and submits
nothing, and a run name whose attempts never did any work takes a corrected spec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crucible.errors import CrucibleError
from crucible.jobs.runs import RESOLVED, prepare_run
from crucible.jobs.spec import parse_spec
from crucible.jobs.submit import submit_run


def data_spec(tmp_path: Path, inputs: list[str], **data: object) -> dict:
    return {
        "kind": "data",
        "name": "web",
        "cluster": {"storage": str(tmp_path / "runs")},
        "data": {"inputs": inputs, **data},
    }


def crucible(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crucible", *args], capture_output=True, text=True, timeout=300
    )


def test_a_data_input_that_matches_nothing_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "data.yaml"
    spec.write_text(yaml.safe_dump(data_spec(tmp_path, [str(tmp_path / "nope" / "x.jsonl")])))
    for extra in (["--local"], []):  # in-process, and before any cluster is contacted
        r = crucible("data", "run", str(spec), *extra)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: data input") and "matches no file" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()  # the name is not claimed


def test_a_train_spec_without_its_shards_is_not_submitted(make_spec, tmp_path: Path) -> None:
    spec = make_spec("t", tmp_path / "runs", data={"shards": str(tmp_path / "no-shards")})
    with pytest.raises(CrucibleError, match="no-shards"):
        submit_run(spec)  # raises before it looks for a cluster: none runs here
    assert not (tmp_path / "runs").exists()


def test_a_run_that_never_did_work_takes_a_corrected_spec(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    first = parse_spec(data_spec(tmp_path, [str(tmp_path / "in" / "*.jsonl")]))
    run = prepare_run(first)
    (run / "jobs.jsonl").write_text('{"job": "j1"}\n')  # submitted, failed before any work
    fixed = parse_spec(data_spec(tmp_path, [str(tmp_path / "in")]))
    assert prepare_run(fixed) == run
    assert "in/*.jsonl" not in (run / RESOLVED).read_text()

    (run / "_work").mkdirs()  # now it has done work: another spec is refused ...
    with pytest.raises(CrucibleError) as e:
        prepare_run(first)
    # ... and the way out is one that `crucible data run` accepts (data runs have no resume)
    assert f"`crucible data run {run / RESOLVED}`" in str(e.value)
    assert "crucible resume" not in str(e.value)
