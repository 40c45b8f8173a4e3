"""The planner against published training runs on A100s.

One set of step-model constants (:class:`crucible.cluster.plan.StepModel` defaults) serves
every point below and the H200 measurements of ``test_planner_measured.py``; they were
fitted once to minimise the worst relative error over all of them, not adjusted per point.
Every point is within 15%, the step-time goal of issue #20 (worst now 12.7%). Throughput in TFLOP/s per GPU is compared in the count each
source uses: Megatron-LM counts the recomputed forward (hardware FLOPs, 8·N per token with
checkpointing); LLM Foundry's MFU counts 6·N plus attention (model FLOPs).
"""

from __future__ import annotations

import pytest

from crucible.cluster.plan import plan
from crucible.cluster.spec import ClusterSpec
from crucible.config import validate
from crucible.model.config import ModelConfig
from crucible.model.presets import get_preset

# Megatron-LM used a 51,200-entry (padded) vocabulary for its GPT runs.
GPT3_175B = get_preset("gpt3-175b").model_copy(update={"vocab_size": 51200})
# Narayanan et al. 2021, Table 1: the 530B model, 105 layers, hidden 20480, 128 heads.
GPT_530B = ModelConfig(vocab_size=51200, n_layers=105, d_model=20480, n_heads=128, max_seq_len=2048)
# MPT (llm-foundry mpt-70b / mpt-30b yamls): no biases, vocab 50368, ALiBi inside the
# attention kernel. Learned positions stand in for it: like ALiBi they add no pass over q
# and k (rotary would), and the counts are within 0.03% of the published 64.86B / 29.98B.
MPT_70B = ModelConfig(
    vocab_size=50368,
    n_layers=80,
    d_model=8192,
    n_heads=64,
    max_seq_len=2048,
    bias=False,
)
MPT_30B = ModelConfig(
    vocab_size=50368,
    n_layers=48,
    d_model=7168,
    n_heads=64,
    max_seq_len=2048,
    bias=False,
)


def _plan(cfg, gpu, gpus, batch, micro, **kw):
    cluster = validate(ClusterSpec, {"gpu": gpu, "nodes": gpus // 8})
    return plan(
        cfg,
        cluster,
        global_batch_size=batch,
        tokens=300e9,
        micro_batch_size=micro,
        activation_checkpointing=True,
        alternatives=False,
        **kw,
    )


def test_megatron_gpt3_175b_on_1024_a100s_takes_34_days_at_140_tflops():
    """Narayanan et al. 2021 §5.1: 175B, 1024 A100s, 140 TFLOP/s/GPU, 300B tokens in about
    34 days. Their TFLOP/s count the recomputed forward (8·N·T), so the planner is given the
    throughput in that count with checkpointing on (ANCHORS.md)."""
    pl = _plan(GPT3_175B, "a100-80gb", 1024, 2048, 1, assumed_flops_per_gpu=140e12)
    assert pl.days == pytest.approx(34, rel=0.10)
    # With 6·N·T the same throughput would give about 25 days: the count matters.
    assert pl.mfu * 312e12 / 140e12 == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize(
    ("model", "rows"),
    [
        # Narayanan et al. 2021, Table 2, "ZeRO-3 without model parallelism", 175B:
        # batch 1536; 384 GPUs micro 4, 768 micro 2, 1536 micro 1; 144 / 88 / 44 TFLOP/s.
        (GPT3_175B, [(384, 1536, 4, 144), (768, 1536, 2, 88), (1536, 1536, 1, 44)]),
        # Same table, 530B: batch 2560 on 640 GPUs (micro 4), 2240 on 1120 (micro 2) and
        # 2240 (micro 1); 138 / 98 / 48 TFLOP/s.
        (GPT_530B, [(640, 2560, 4, 138), (1120, 2240, 2, 98), (2240, 2240, 1, 48)]),
    ],
    ids=["175b", "530b"],
)
def test_zero3_throughput_falls_with_gpus_like_megatron_table2(model, rows):
    predicted = []
    for gpus, batch, micro, published in rows:
        pl = _plan(model, "a100-80gb", gpus, batch, micro)
        assert pl.feasible, pl.problems
        assert pl.hardware_tflops_per_gpu == pytest.approx(published, rel=0.15), (gpus, published)
        predicted.append(pl.hardware_tflops_per_gpu)
    assert predicted[0] > predicted[1] > predicted[2]
    assert pl.bound == "network"  # the largest configuration is limited by the NICs


@pytest.mark.parametrize(
    ("cfg", "gpu", "gpus", "batch", "micro", "mfu"),
    [
        # MosaicML llm-foundry scripts/train/benchmarking/README.md, "A100 80GB with 1600 Gbps
        # node-node interconnect (RoCE)": MPT-70B, seq 2048, 64 GPUs, micro 8 × accum 4,
        # global 2048, FSDP FULL_SHARD, activation checkpointing: MFU 53.33%.
        (MPT_70B, "a100-80gb", 64, 2048, 8, 0.5333),
        # Same README, "A100 40GB with 1600 Gbps": MPT-30B, seq 2048, 128 GPUs, micro 6 ×
        # accum 1, global 768, FULL_SHARD, checkpointing: MFU 52.25%.
        (MPT_30B, "a100-40gb", 128, 768, 6, 0.5225),
    ],
    ids=["mpt-70b-64xa100-80", "mpt-30b-128xa100-40"],
)
def test_llm_foundry_fsdp_mfu(cfg, gpu, gpus, batch, micro, mfu):
    pl = _plan(cfg, gpu, gpus, batch, micro)
    assert pl.feasible, pl.problems
    assert pl.mfu == pytest.approx(mfu, rel=0.15)
    assert pl.bound == "compute"
