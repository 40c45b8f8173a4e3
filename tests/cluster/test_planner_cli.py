"""``crucible plan`` from a spec file and from flags, through the typer command."""

from __future__ import annotations

import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from crucible.errors import CrucibleError
from crucible.jobs.cli.plan import plan_cmd, plan_from_args

app = typer.Typer()
app.command()(plan_cmd)
runner = CliRunner()

SPEC = {
    "kind": "train",
    "name": "gpt3-175b",
    "cluster": {"gpu": "a100-80gb", "nodes": 64},
    "model": {"preset": "gpt3-175b", "parallel": {"activation_checkpointing": True}},
    "data": {"shards": "/data/shards"},
    "optim": {"global_batch_size": 1536, "micro_batch_size": 1},
    "train": {"num_workers": 512, "max_tokens": 300e9},
}


@pytest.fixture()
def spec_file(tmp_path):
    path = tmp_path / "gpt3-175b.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_plan_spec_on_64_nodes_prints_an_actionable_report(spec_file):
    r = runner.invoke(app, [str(spec_file)], terminal_width=120)
    assert r.exit_code == 0, r.output
    for needle in [
        "FEASIBLE",
        "model states (ZeRO-3",
        "activations (micro-batch 1",
        "accumulation",
        "network-bound",
        "MFU",
        "days",
        "GPU-hours",
        "MWh",
        "$",
        "what helps",
        "ZeRO++",
    ]:
        assert needle in r.output, needle


def test_plan_spec_on_128_nodes_says_the_batch_does_not_divide(spec_file):
    r = runner.invoke(app, [str(spec_file), "--nodes", "128"], terminal_width=120)
    assert r.exit_code == 1
    assert "NOT FEASIBLE" in r.output and "not divisible by the data-parallel size 1024" in r.output
    fixed = runner.invoke(
        app, [str(spec_file), "--nodes", "128", "--set", "optim.global_batch_size=2048", "--json"]
    )
    assert fixed.exit_code == 0, fixed.output
    data = json.loads(fixed.output)
    assert data["feasible"] and data["num_gpus"] == 1024 and data["grad_accum_steps"] == 2


def test_plan_from_flags():
    r = runner.invoke(
        app,
        [
            "--model",
            "gpt3-175b",
            "--nodes",
            "128",
            "--gpu",
            "a100-80gb",
            "--tokens",
            "300e9",
            "--global-batch",
            "2048",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["bound"] == "network" and data["num_gpus"] == 1024
    zpp = runner.invoke(
        app,
        [
            "--model",
            "gpt3-175b",
            "--nodes",
            "128",
            "--tokens",
            "300e9",
            "--global-batch",
            "2048",
            "--zeropp",
            "--json",
        ],
    )
    better = json.loads(zpp.output)
    assert better["hpz_partition_size"] == 8 and better["mfu"] > data["mfu"]


def test_plan_bad_input_is_one_clear_error(spec_file):
    with pytest.raises(CrucibleError, match="cluster.gpu"):
        plan_from_args(spec_file, gpu="a100")
    with pytest.raises(CrucibleError, match="cluster.nodes = 0"):
        plan_from_args(spec_file, nodes=0)
    with pytest.raises(CrucibleError, match="--tokens"):
        plan_from_args(None, model="gpt3-175b")
    with pytest.raises(CrucibleError, match="unknown preset"):
        plan_from_args(None, model="gpt5", tokens=1e9, global_batch=8)
