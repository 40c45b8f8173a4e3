"""The one planner: what the train job runs is what ``crucible plan`` and ``--dry-run`` print,
and the DeepSpeed config is the one the train job ran before the planners were merged."""

from __future__ import annotations

import json

import pytest

from crucible.cluster.plan import plan_from_spec, plan_run
from crucible.jobs.cli.plan import format_run_plan
from crucible.jobs.spec import parse_spec

# The train job's DeepSpeed config for the tiny spec below on 2 CPU ranks, as
# jobs/train/plan.py built it (commit 56b265e), key order included; since then the bucket
# sizes are capped by the model's 141,056 parameters (DeepSpeed allocates them whole).
TINY_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "train_batch_size": 8,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 141056,
        "stage3_prefetch_bucket_size": 141056,
        "stage3_param_persistence_threshold": 100000,
        "stage3_max_live_parameters": 1000000000,
        "stage3_gather_16bit_weights_on_model_save": False,
        "zero_hpz_partition_size": 1,
        "zero_quantized_weights": False,
        "zero_quantized_gradients": False,
    },
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
    "optimizer": {
        "type": "AdamW",
        "params": {
            "lr": 0.0003,
            "betas": [0.9, 0.95],
            "eps": 1e-08,
            "weight_decay": 0.1,
            "adam_w_mode": True,
            "torch_adam": True,
        },
    },
}


def _spec(**sections):
    data = {
        "kind": "train",
        "name": "tiny",
        "model": {"preset": "tiny"},
        "data": {"shards": "/nonexistent/shards"},
        "optim": {"global_batch_size": 8, "micro_batch_size": 2},
        "train": {"num_workers": 2, "max_steps": 10},
    }
    return parse_spec(data | sections)


def test_the_job_runs_the_known_good_deepspeed_config():
    run = plan_run(_spec(), 2, seq_len=64, use_gpu=False)
    assert json.dumps(run.ds_config) == json.dumps(TINY_DS_CONFIG)  # same bytes, same order
    assert (run.micro_batch_size, run.grad_accum_steps, run.total_steps) == (2, 2, 10)
    assert run.tokens_per_step == 8 * 64


@pytest.mark.parametrize(
    "parallel",
    [{}, {"zero_stage": 2, "offload_optimizer": "cpu"}, {"activation_checkpointing": True}],
)
def test_crucible_plan_shows_what_the_job_runs(parallel):
    spec = _spec(
        model={"preset": "tiny", "parallel": parallel},
        cluster={"gpu": "a100-80gb", "gpus_per_node": 2},
    )
    shown = plan_from_spec(spec, alternatives=False)
    run = plan_run(spec, shown.num_gpus, use_gpu=True)
    assert shown.feasible
    assert json.dumps(shown.ds_config) == json.dumps(run.ds_config)
    assert shown.run.memory.total_bytes == run.memory.total_bytes
    assert (shown.steps, shown.micro_batch_size) == (run.total_steps, run.micro_batch_size)


def test_dry_run_prints_the_config_that_runs():
    spec = _spec()
    run = plan_run(spec, 2)
    text = format_run_plan(spec, run)
    assert json.dumps(run.ds_config, indent=2) in text
    assert "micro-batch 2 × 2 accumulation steps × 2 ranks" in text


def test_crucible_plan_of_a_local_cpu_spec_skips_what_it_cannot_time(tmp_path, monkeypatch):
    # A CPU "cluster" has no interconnect: the "2 nodes" alternative cannot be timed and is
    # left out instead of failing the whole plan (it did for examples/train-tiny.yaml).
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    from crucible.cluster import hardware

    monkeypatch.setattr(hardware, "measure_cpu_flops", lambda *a, **k: 1e11)
    shown = plan_from_spec(_spec(train={"num_workers": 1, "max_steps": 10}))
    assert shown.feasible and shown.gpu == "cpu"
    assert all("nodes" not in a.change for a in shown.alternatives)
