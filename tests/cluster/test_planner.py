"""The planner: DeepSpeed-exact model states, activations, communication volumes, batch and
micro-batch choice, time/energy/cost arithmetic, and infeasible plans that say why."""

from __future__ import annotations

import io
import itertools
import math

import pytest
from rich.console import Console

from crucible.cluster.plan import StepModel, plan, plan_from_spec
from crucible.cluster.plan.comm import zero_comm_volume
from crucible.cluster.plan.memory import (
    activation_bytes,
    logits_bytes,
    zero2_states,
    zero3_states,
)
from crucible.cluster.plan.render import plan_renderable
from crucible.cluster.spec import ClusterSpec
from crucible.config import validate
from crucible.jobs.spec import parse_spec
from crucible.model.accounting import (
    hardware_flops_per_token,
    largest_layer_params,
    model_flops_per_token,
    num_params,
)
from crucible.model.config import ModelConfig
from crucible.model.presets import get_preset
from crucible.model.spec import ParallelSpec

GiB = 2**30
SIZES = [1_000_003, 124_439_808, 6_658_859_008, 174_594_465_792, 1_000_000_000_000]
NODES = [1, 2, 7, 64, 1024]
GPUS_PER_NODE = [1, 8, 16]


def format_plan(pl, width: int = 110) -> str:
    """The report as plain text, as a terminal of ``width`` columns shows it."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(plan_renderable(pl))
    return buf.getvalue()


def _cluster(gpu: str = "a100-80gb", nodes: int = 1) -> ClusterSpec:
    return validate(ClusterSpec, {"gpu": gpu, "nodes": nodes})


def test_zero3_states_equal_deepspeed_estimator_on_a_grid():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    checked = 0
    for total, nodes, gpn in itertools.product(SIZES, NODES, GPUS_PER_NODE):
        largest = total // 97 + 11
        for offload, offload_params, zero_init in itertools.product([True, False], repeat=3):
            if offload_params and not offload:
                continue
            ds = estimate_zero3_model_states_mem_needs(
                total, largest, gpn, nodes, offload, offload_params, zero_init
            )
            ours = zero3_states(total, largest, gpn, nodes, offload, offload_params, zero_init)
            assert (ours.cpu_bytes, ours.gpu_bytes, ours.largest_layer_bytes) == ds
            checked += 1
    assert checked == len(SIZES) * len(NODES) * len(GPUS_PER_NODE) * 6


def test_zero2_states_equal_deepspeed_estimator_on_a_grid():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for total, nodes, gpn, offload in itertools.product(SIZES, NODES, GPUS_PER_NODE, [True, False]):
        ds = estimate_zero2_model_states_mem_needs(total, gpn, nodes, offload)
        ours = zero2_states(total, gpn, nodes, offload)
        assert (ours.cpu_bytes, ours.gpu_bytes) == ds


@pytest.mark.parametrize("preset", ["gpt3-175b", "llama2-70b", "gpt3-1.3b"])
@pytest.mark.parametrize(("nodes", "offload"), [(1, "none"), (16, "none"), (64, "cpu")])
def test_plan_model_states_are_deepspeed_all_cold_figures(preset, nodes, offload):
    """The plan of a preset reports exactly what estimate_..._all_cold prints for it."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = get_preset(preset)
    n, big = num_params(cfg), largest_layer_params(cfg)
    par = ParallelSpec(zero_stage=3, offload_optimizer=offload)
    pl = plan(
        cfg, _cluster(nodes=nodes), par, global_batch_size=8 * nodes, tokens=1e9, alternatives=False
    )
    off = offload == "cpu"
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(n, big, 8, nodes, off, False, True)
    assert (pl.run.memory.state_bytes, pl.run.memory.state_cpu_bytes_per_node) == (gpu3, cpu3)
    assert pl.states_by_stage[2] == estimate_zero2_model_states_mem_needs(n, 8, nodes, off)[1]


def test_largest_layer_agrees_with_deepspeed_on_a_real_model():
    """DeepSpeed's own model walk finds the same totals the planner uses."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    from crucible.model.gpt import GPT

    cfg = ModelConfig(vocab_size=512, n_layers=2, n_heads=4, d_model=64, max_seq_len=32)
    assert model_to_params(GPT(cfg)) == (num_params(cfg), largest_layer_params(cfg))


def test_activation_memory_follows_korthikanti():
    # Korthikanti et al. 2022, eq. 1 (t = 1): s·b·h·(34 + 5·a·s/h) bytes per layer.
    cfg = get_preset("gpt3-175b")
    s, b, h, a, layers = 2048, 1, 12288, 96, 96
    full = s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes(cfg, b, s, checkpointing=False, scores_stored=True) == layers * full
    assert activation_bytes(cfg, 4, s, False, True) == 4 * layers * full
    # Full recompute: layer inputs (2·s·b·h each) plus one layer's working set.
    assert activation_bytes(cfg, b, s, True, True) == layers * 2 * s * b * h + full
    # Flash attention never stores the a·s² scores.
    assert activation_bytes(cfg, b, s, False, False) == layers * 34 * s * b * h
    assert logits_bytes(cfg, 2, s) == 10 * 2 * s * 50257


def test_zero3_comm_volume_by_hand():
    psi = 174_594_465_792
    p = 2 * psi
    v = zero_comm_volume(psi, 3, 8, 192, grad_accum_steps=1)
    assert v.inter_node_bytes == pytest.approx(3 * p * 1535 / 1536) and v.intra_node_bytes == 0
    assert zero_comm_volume(psi, 3, 8, 192, 4).inter_node_bytes == pytest.approx(
        4 * v.inter_node_bytes
    )
    one_node = zero_comm_volume(psi, 3, 8, 1, 1)
    assert one_node.inter_node_bytes == 0 and one_node.intra_node_bytes == pytest.approx(
        3 * p * 7 / 8
    )
    # ZeRO++ (Wang et al. 2023): int8 forward gather (P/2), backward gather inside the node
    # (hpZ), int4 gradients (P/4 across nodes after an intra-node P/4 all-to-all).
    pp = zero_comm_volume(
        psi, 3, 8, 192, 1, hpz_partition_size=8, quantized_weights=True, quantized_gradients=True
    )
    assert pp.inter_node_bytes == pytest.approx(p / 2 * 1535 / 1536 + p / 4 * 191 / 192)
    assert pp.intra_node_bytes == pytest.approx(p * 7 / 8 + p / 4 * 7 / 8)
    # The paper's headline: cross-node volume 3M -> 0.75M (4x less).
    assert v.inter_node_bytes / pp.inter_node_bytes == pytest.approx(4, rel=0.01)
    # ZeRO-2 reduce-scatters every micro-batch and gathers once; ZeRO-1 once each; DDP all-reduce.
    assert zero_comm_volume(psi, 2, 8, 4, 3).inter_node_bytes == pytest.approx(4 * p * 31 / 32)
    assert zero_comm_volume(psi, 1, 8, 4, 3).inter_node_bytes == pytest.approx(2 * p * 31 / 32)
    assert zero_comm_volume(psi, 0, 8, 4, 3).inter_node_bytes == pytest.approx(2 * p * 31 / 32)


def test_gpt3_on_1536_a100_with_3m_batch_is_network_bound_and_zeropp_helps():
    cfg = get_preset("gpt3-175b")
    pl = plan(cfg, _cluster(nodes=192), global_batch_size=1536, tokens=300e9)
    assert pl.feasible and pl.bound == "network"
    assert pl.comm_seconds > 2 * pl.compute_seconds
    assert pl.mfu < 0.2
    by_change = {a.change: a for a in pl.alternatives}
    zpp = by_change["ZeRO++ hpZ + qwZ + qgZ"]
    assert zpp.feasible and zpp.mfu > 2 * pl.mfu and zpp.days < pl.days
    assert any(a.startswith("ZeRO++") for a in pl.advice)
    text = format_plan(pl)
    assert "network-bound" in text and "ZeRO++" in text and "NOT FEASIBLE" not in text


def test_larger_micro_batch_moves_gpt3_towards_compute_bound():
    cfg = get_preset("gpt3-175b")
    small = plan(cfg, _cluster(nodes=64), global_batch_size=512, tokens=1e9, alternatives=False)
    large = plan(cfg, _cluster(nodes=64), global_batch_size=4096, tokens=1e9, alternatives=False)
    assert small.micro_batch_size * small.grad_accum_steps == 1
    assert large.micro_batch_size * large.grad_accum_steps == 8
    assert small.bound == "network" and large.bound == "compute" and large.mfu > small.mfu


def test_micro_batch_is_the_largest_that_fits_and_accumulation_fills_the_batch():
    cfg = get_preset("gpt3-13b")
    pl = plan(
        cfg,
        _cluster(gpu="a100-40gb", nodes=2),
        global_batch_size=1024,
        tokens=1e9,
        activation_checkpointing=True,
        alternatives=False,
    )
    assert pl.micro_batch_size * pl.grad_accum_steps * pl.num_gpus == 1024
    assert pl.memory_bytes <= pl.usable_memory_bytes
    k = pl.max_micro_batch_size
    per_seq = activation_bytes(cfg, 1, 2048, True) + logits_bytes(cfg, 1, 2048)
    assert pl.run.memory.state_bytes + k * per_seq <= pl.usable_memory_bytes
    assert pl.run.memory.state_bytes + (k + 1) * per_seq > pl.usable_memory_bytes


def test_time_energy_and_cost_arithmetic():
    cfg = get_preset("gpt3-1.3b")
    cluster = validate(
        ClusterSpec, {"gpu": "h100-sxm", "nodes": 2, "pue": 1.5, "usd_per_gpu_hour": 2.0}
    )
    pl = plan(cfg, cluster, global_batch_size=256, tokens=1e10, assumed_mfu=0.4, alternatives=False)
    steps = math.ceil(1e10 / (256 * 2048))
    expect_s = steps * 256 * 2048 / 16 * model_flops_per_token(cfg, 2048) / (989e12 * 0.4)
    assert pl.steps == steps and pl.bound == "assumed MFU" and pl.mfu == pytest.approx(0.4)
    assert pl.days * 86400 == pytest.approx(expect_s)
    assert pl.gpu_hours == pytest.approx(expect_s * 16 / 3600)
    assert pl.energy_mwh == pytest.approx(pl.gpu_hours * 700 * 1.5 / 1e6)
    assert pl.cost_usd == pytest.approx(pl.gpu_hours * 2.0)


def test_checkpointing_counts_the_recomputed_forward():
    cfg = get_preset("gpt3-6.7b")
    kw = dict(global_batch_size=64, tokens=1e9, micro_batch_size=1, alternatives=False)
    on = plan(cfg, _cluster(), activation_checkpointing=True, **kw)
    off = plan(cfg, _cluster(), activation_checkpointing=False, **kw)
    ratio = hardware_flops_per_token(cfg, 2048, True) / hardware_flops_per_token(cfg, 2048, False)
    assert on.compute_seconds / off.compute_seconds == pytest.approx(ratio)
    assert on.run.memory.activation_bytes < off.run.memory.activation_bytes
    # The recomputed forward's memory-bound kernels run again too; the fetches do not.
    assert on.memory_seconds > off.memory_seconds and on.fetch_seconds == off.fetch_seconds


def test_one_gpu_step_is_matmuls_memory_bound_kernels_and_zero3_fetches():
    cfg = get_preset("gpt3-1.3b")
    one = validate(ClusterSpec, {"gpu": "h100-sxm", "gpus_per_node": 1})
    kw = dict(global_batch_size=16, tokens=1e9, micro_batch_size=8, alternatives=False)
    pl = plan(cfg, one, **kw)
    assert pl.comm_seconds == 0 and pl.grad_accum_steps == 2
    assert pl.step_seconds == pytest.approx(
        pl.compute_seconds + pl.memory_seconds + pl.fetch_seconds
    )
    # ZeRO-3 gathers 6 modules a layer (2 norms, 4 linears) and 4 more, every micro-batch.
    assert pl.fetch_seconds == pytest.approx(2 * (24 * 6 + 4) * StepModel().zero3_module_seconds)
    # The same bytes take longer on a slower memory: the A100's HBM is 2.039 / 3.35 as fast.
    a100 = plan(cfg, validate(ClusterSpec, {"gpu": "a100-80gb", "gpus_per_node": 1}), **kw)
    assert a100.memory_seconds == pytest.approx(pl.memory_seconds * 3.35 / 2.039)
    # Adam's traffic leaves the GPU with the optimizer; ZeRO-2 has no per-module fetches.
    offload = ParallelSpec(offload_optimizer="cpu")
    assert plan(cfg, one, offload, **kw).memory_seconds < pl.memory_seconds
    zero2 = plan(cfg, one, ParallelSpec(zero_stage=2), **kw)
    assert zero2.fetch_seconds == 0 and zero2.memory_seconds < pl.memory_seconds
    # An assumed MFU replaces the whole model.
    assumed = plan(cfg, one, assumed_mfu=0.5, **kw)
    assert assumed.memory_seconds == assumed.fetch_seconds == 0


def test_indivisible_global_batch_is_infeasible_with_fixes():
    pl = plan(get_preset("gpt3-175b"), _cluster(nodes=128), global_batch_size=1536, tokens=300e9)
    assert not pl.feasible
    assert (
        "optim.global_batch_size 1536 is not divisible by the data-parallel size 1024"
        in (pl.problems[0])
    )
    assert "1024 or 2048" in pl.problems[0] and "cluster.nodes 64 or 96" in pl.problems[0]
    fixes = {a.change for a in pl.alternatives if a.feasible}
    assert {"global batch 2048", "96 nodes"} <= fixes
    assert any("global batch 2048: feasible" in a for a in pl.advice)


def test_memory_overflow_says_by_how_much_and_what_helps():
    cfg = get_preset("gpt3-175b")
    pl = plan(
        cfg,
        _cluster(gpu="a100-40gb", nodes=2),
        global_batch_size=64,
        tokens=1e9,
        activation_checkpointing=False,
    )
    assert not pl.feasible
    (problem,) = pl.problems
    assert "the model states alone need" in problem and "GiB over" in problem
    over = float(problem.split(": ")[-1].split(" GiB")[0].replace(",", ""))
    assert over == pytest.approx((pl.memory_bytes - pl.usable_memory_bytes) / GiB, abs=0.06)
    assert any(a.startswith("turn on model.parallel.activation_checkpointing") for a in pl.advice)
    assert any(a.startswith("use at least") and "nodes" in a for a in pl.advice)
    assert any(a.startswith("offload optimizer to CPU: feasible") for a in pl.advice)


def test_zero2_that_cannot_hold_the_weights_suggests_zero3():
    cfg = get_preset("gpt3-175b")
    pl = plan(
        cfg, _cluster(nodes=64), ParallelSpec(zero_stage=2), global_batch_size=512, tokens=1e9
    )
    assert not pl.feasible and "model states alone" in pl.problems[0]
    assert any(a.startswith("ZeRO stage 3: feasible") for a in pl.advice)


def test_too_large_fixed_micro_batch_points_at_smaller_one():
    cfg = get_preset("gpt3-13b")
    pl = plan(
        cfg,
        _cluster(gpu="a100-40gb", nodes=4),
        global_batch_size=2048,
        tokens=1e9,
        micro_batch_size=64,
        activation_checkpointing=True,
    )
    assert not pl.feasible and "micro-batch 64" in pl.problems[0]
    assert f"use optim.micro_batch_size ≤ {pl.max_micro_batch_size}" in pl.advice


def test_deepspeed_config_carries_the_zeropp_knobs():
    par = ParallelSpec(
        zero_hpz_partition_size=8, zero_quantized_weights=True, zero_quantized_gradients=True
    )
    pl = plan(
        get_preset("gpt3-13b"),
        _cluster(nodes=4),
        par,
        global_batch_size=512,
        tokens=1e9,
        alternatives=False,
    )
    ds = pl.ds_config
    zero = ds["zero_optimization"]
    assert (
        zero["zero_hpz_partition_size"],
        zero["zero_quantized_weights"],
        zero["zero_quantized_gradients"],
    ) == (8, True, True)
    assert ds["train_batch_size"] == 512 == pl.micro_batch_size * pl.grad_accum_steps * 32
    assert pl.run.memory.hpz_bytes == 2 * pl.params // 8  # hpZ's secondary bf16 shard (ZeRO++ §3.2)


def _train_spec(nodes: int, **cluster):
    return parse_spec(
        {
            "kind": "train",
            "name": "gpt3",
            "cluster": {"gpu": "a100-80gb", "nodes": nodes, **cluster},
            "model": {"preset": "gpt3-175b", "parallel": {"activation_checkpointing": True}},
            "data": {"shards": "/data/shards"},
            "optim": {"global_batch_size": 1536, "micro_batch_size": 1},
            "train": {"num_workers": 512, "max_tokens": 300e9},
        }
    )


def test_plan_from_a_train_spec_uses_its_sections():
    pl = plan_from_spec(_train_spec(64, usd_per_gpu_hour=1.0))
    assert (pl.num_gpus, pl.micro_batch_size, pl.grad_accum_steps) == (512, 1, 3)
    assert pl.activation_checkpointing and pl.tokens == 300e9 and pl.usd_per_gpu_hour == 1.0
    assert pl.feasible and not pl.notes
    other = plan_from_spec(_train_spec(96))
    assert other.notes and "train.num_workers: 768" in other.notes[0]


def test_cpu_cluster_of_several_nodes_asks_for_the_gpu_type(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    from crucible.errors import CrucibleError

    cluster = validate(ClusterSpec, {"gpu": "cpu", "nodes": 4})
    with pytest.raises(CrucibleError, match="set cluster.gpu"):
        plan(get_preset("gpt3-125m"), cluster, global_batch_size=8, tokens=1e6)
    # One CPU "device": no communication, the measured peak sets the time.
    local = plan(
        get_preset("gpt3-125m"),
        validate(ClusterSpec, {}),
        global_batch_size=8,
        tokens=1e6,
        alternatives=False,
    )
    assert local.peak_measured and local.comm_seconds == 0 and local.bound == "compute"
