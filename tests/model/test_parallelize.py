"""DeepSpeed wrapping: typed spec → valid DeepSpeed config; ZeRO-3 on 2 CPU ranks over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crucible.config import validate
from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig
from crucible.model.parallelize import build_deepspeed_config, parallelize
from crucible.model.spec import ParallelSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "parallel",
    [
        ParallelSpec(),
        ParallelSpec(zero_stage=0, precision="fp32"),
        ParallelSpec(zero_stage=1, offload_optimizer="cpu"),
        ParallelSpec(zero_stage=2, overlap_comm=False, contiguous_gradients=False),
        ParallelSpec(offload_optimizer="cpu", offload_params="cpu", prefetch_bucket_size=123),
        ParallelSpec(
            zero_hpz_partition_size=8, zero_quantized_weights=True, zero_quantized_gradients=True
        ),
    ],
)
def test_deepspeed_accepts_generated_config(parallel: ParallelSpec) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    optimizer = {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}}
    config = build_deepspeed_config(
        parallel, micro_batch_size=4, grad_accum_steps=8, world_size=1, optimizer=optimizer
    )
    ds = DeepSpeedConfig(config)  # DeepSpeed's own parser and batch-size consistency check
    zero = ds.zero_config
    assert ds.train_batch_size == 32 and ds.gradient_accumulation_steps == 8
    assert ds.gradient_clipping == 1.0
    assert ds.bfloat16_config.enabled == (parallel.precision == "bf16")
    assert zero.stage == parallel.zero_stage
    assert zero.overlap_comm == parallel.overlap_comm
    assert zero.reduce_bucket_size == parallel.reduce_bucket_size
    assert (zero.offload_optimizer is not None) == (parallel.offload_optimizer == "cpu")
    if parallel.zero_stage == 3:
        assert zero.prefetch_bucket_size == parallel.prefetch_bucket_size
        assert zero.param_persistence_threshold == parallel.param_persistence_threshold
        assert zero.max_live_parameters == parallel.max_live_parameters
        assert (zero.offload_param is not None) == (parallel.offload_params == "cpu")
        assert zero.zero_hpz_partition_size == parallel.zero_hpz_partition_size
        assert zero.zero_quantized_weights == parallel.zero_quantized_weights
        assert zero.zero_quantized_gradients == parallel.zero_quantized_gradients
    assert ds.optimizer_name == "adamw"


def test_batch_sizes_must_be_positive() -> None:
    with pytest.raises(CrucibleError, match="grad_accum_steps must be at least 1"):
        build_deepspeed_config(ParallelSpec(), micro_batch_size=1, grad_accum_steps=0, world_size=1)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"zero_stage": 2, "offload_params": "cpu"}, "offload_params"),
        ({"zero_stage": 1, "zero_quantized_weights": True}, "zero_quantized_weights"),
        ({"zero_stage": 2, "zero_hpz_partition_size": 8}, "zero_hpz_partition_size"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer"),
        ({"precision": "fp16"}, "precision"),
        ({"offload_optimizer": "nvme"}, "offload_optimizer"),
    ],
)
def test_invalid_parallel_spec_names_field(data: dict, field: str) -> None:
    with pytest.raises(CrucibleError, match=rf"parallel: {field} = (?!null)"):
        validate(ParallelSpec, data, source="parallel")


def test_parallelize_checkpointing_keeps_outputs(gpt_cfg: ModelConfig, make_model) -> None:
    model = make_model(gpt_cfg).train()
    tokens = torch.randint(0, gpt_cfg.vocab_size, (2, 8))
    before = model(tokens, tokens)[1]
    out = parallelize(model, ParallelSpec(activation_checkpointing=True))
    assert out is model
    assert all("forward" in block.__dict__ for block in model.blocks)
    torch.testing.assert_close(model(tokens, tokens)[1], before)


@pytest.mark.slow
def test_zero3_trains_on_two_cpu_ranks(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("zero3_worker.py")
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += [str(worker), str(tmp_path), "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2 and r["zero_stage"] == 3
        losses = r["losses"]
        assert all(map(lambda x: x == x and abs(x) < 1e9, losses))  # finite
        assert losses[-1] < losses[0] - 0.5, losses
        # zero.Init + rank-0 init gives exactly the single-process init_weights values.
        assert r["same_init"]
        # Every parameter is sharded: each rank holds half, and nothing full stays behind.
        assert set(r["held"].values()) == {0}
        for name, full in r["full"].items():
            assert r["local"][name] == (full + 1) // 2, name
    assert sum(ranks[0]["full"].values()) == 141_056  # the tiny preset's num_params


@pytest.mark.slow
def test_parallelize_compile_after_checkpointing_same_loss_and_grads(
    gpt_cfg: ModelConfig, make_model
) -> None:
    model = make_model(gpt_cfg).train()
    tokens = torch.randint(0, gpt_cfg.vocab_size, (2, 16))
    loss = model(tokens, tokens)[1]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    names = list(model.state_dict())
    parallelize(model, ParallelSpec(activation_checkpointing=True, compile=True))
    compiled = model(tokens, tokens)[1]
    compiled.backward()
    torch.testing.assert_close(compiled, loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == names  # compiled in place: checkpoints unchanged


def test_buckets_capped_by_the_model_size() -> None:
    # DeepSpeed allocates the reduce bucket whole: 5e8 fp32 elements are 2 GB per rank.
    from deepspeed.runtime.config import DeepSpeedConfig

    parallel = ParallelSpec(zero_stage=3)
    small = build_deepspeed_config(
        parallel, micro_batch_size=1, grad_accum_steps=1, world_size=1, num_params=123_456
    )
    zero = DeepSpeedConfig(small).zero_config
    assert zero.reduce_bucket_size == 123_456 and zero.prefetch_bucket_size == 123_456
    large = build_deepspeed_config(
        parallel, micro_batch_size=1, grad_accum_steps=1, world_size=1, num_params=10**12
    )
    assert large["zero_optimization"]["reduce_bucket_size"] == parallel.reduce_bucket_size
