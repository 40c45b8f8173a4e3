"""``crucible model info|list`` (jobs/cli/model.py): figures from the accounting, no weights."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crucible.errors import CrucibleError
from crucible.jobs.cli.model import app, describe_model, load_model_config
from crucible.model.presets import get_preset

runner = CliRunner()


def test_info_gpt3_175b_is_fast_and_allocates_nothing() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = runner.invoke(app, ["info", "gpt3-175b"], terminal_width=140)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
    assert result.exit_code == 0, result.output
    assert "174,604,259,328" in result.output
    assert "2.54 TiB" in result.output  # 16 bytes/param of bf16 mixed-precision Adam


def test_list_shows_every_preset() -> None:
    result = runner.invoke(app, ["list"], terminal_width=160)
    assert result.exit_code == 0
    for name in ["tiny", "gpt2-xl", "gpt3-13b", "llama2-70b"]:
        assert name in result.output
    assert "68.98B" in result.output


def test_describe_model_rows() -> None:
    rows = dict(describe_model(get_preset("llama2-70b"), seq_len=4096))
    assert rows["heads (q / kv) × head dim"] == "64 / 8 (GQA) × 128"
    assert rows["parameters"].startswith("68.98B")
    assert "T=4096" in " ".join(rows)


def test_info_reads_a_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "run.yaml"
    spec.write_text("kind: train\nname: x\nmodel:\n  preset: tiny\n  n_layers: 4\n")
    assert load_model_config(str(spec)).n_layers == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n  n_heads: 5\n")
    with pytest.raises(CrucibleError, match=r"bad.yaml: model: n_heads = 5 is invalid"):
        load_model_config(str(bad))
    with pytest.raises(CrucibleError, match="unknown preset; did you mean gpt3-175b"):
        load_model_config("gpt3-175")
