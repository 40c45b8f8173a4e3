"""One rank of the ZeRO-3 CPU test (run under torchrun by test_parallelize.py).

Builds the tiny preset sharded under ``deepspeed.zero.Init``, wraps it with ``parallelize``
and ``deepspeed.initialize``, trains a few steps on a fixed batch over gloo, and writes what
the test checks to ``<out>/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from crucible.model.gpt import build_model, init_weights
from crucible.model.parallelize import build_deepspeed_config, build_zero3_model, parallelize
from crucible.model.presets import get_preset
from crucible.model.spec import ParallelSpec


def main(out: Path, steps: int) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel = ParallelSpec(
        zero_stage=3,
        precision="fp32",
        activation_checkpointing=True,
        param_persistence_threshold=0,  # shard every parameter, however small
    )
    ds_config = build_deepspeed_config(
        parallel,
        micro_batch_size=4,
        grad_accum_steps=1,
        world_size=world,
        grad_clip=1.0,
        optimizer={"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
    )
    cfg = get_preset("tiny")
    model = build_zero3_model(cfg, ds_config, seed=0)
    local = {n: p.ds_tensor.numel() for n, p in model.named_parameters()}
    full = {n: p.ds_numel for n, p in model.named_parameters()}
    held = {n: p.numel() for n, p in model.named_parameters()}  # 0: released after Init

    # zero.Init + gathered init gives exactly init_weights' values (same seed, CPU).
    reference = dict(init_weights(build_model(cfg), seed=0).named_parameters())
    same_init = True
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            same_init &= torch.equal(p.detach(), reference[name].detach())

    model = parallelize(model, parallel)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=gen)
    losses = []
    for _ in range(steps):
        _, loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    result = dict(
        rank=rank,
        world=world,
        losses=losses,
        local=local,
        full=full,
        held=held,
        same_init=bool(same_init),
        zero_stage=engine.zero_optimization_stage(),
    )
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(Path(sys.argv[1]), int(sys.argv[2]))
