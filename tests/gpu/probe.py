"""What the GPU tests look at inside one fresh process (a CUDA context and a process group
per probe, so nothing leaks into the test session): run as
``python tests/gpu/probe.py engine|checkpointing`` and read the JSON it prints last.

``engine``: crucible's own engine (``build_engine`` from a spec and its plan, ZeRO-3, bf16,
NCCL) for a few steps: the backend, the optimizer class, dtypes, the attention kernels the
profiler saw, the losses. ``checkpointing``: one forward and backward of a plain GPT in bf16
with and without activation checkpointing: losses, gradients, peak memory.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

import torch

# First match wins: cuDNN's fused attention kernels also carry "flash" in their names.
KERNEL_FAMILIES = {
    "cudnn": ("cudnn",),
    "flash": ("flash",),
    "memory_efficient": ("fmha", "efficient_attention", "mem_efficient"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def attention_kernels(run: Any) -> dict[str, list[str]]:
    """The CUDA kernels of each SDPA family that ``run()`` launched, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    found: dict[str, list[str]] = {family: [] for family in KERNEL_FAMILIES}
    for name in sorted({e.key for e in prof.key_averages()}):
        for family, frags in KERNEL_FAMILIES.items():
            if any(f in name.lower() for f in frags):
                found[family].append(name)
                break
    return found


def probe_engine() -> dict[str, Any]:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))  # fmt: skip
    from crucible.jobs.train.environment import prepare_process

    prepare_process(use_gpu=True)
    import deepspeed
    import torch.distributed as dist

    from crucible.cluster.plan import plan_run
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.engine import build_engine

    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl")
    seq = 512
    spec = parse_spec({
        "kind": "train", "name": "probe", "cluster": {"storage": "/tmp/crucible-probe"},
        "model": {"preset": "gpt3-125m", "max_seq_len": seq},
        "data": {"shards": "/tmp/none"},
        "optim": {"global_batch_size": 8, "micro_batch_size": 4, "lr": 3e-4, "warmup_steps": 0},
        "train": {"num_workers": 1, "max_steps": 10},
    })  # fmt: skip
    plan = plan_run(spec, 1, seq_len=seq, use_gpu=True)  # type: ignore[arg-type]
    engine = build_engine(spec, plan)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50257, (4, seq + 1), generator=gen).to(engine.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(plan.grad_accum_steps * 4):
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))

    def one_micro_batch() -> None:
        _, loss = engine(x, y)
        engine.backward(loss)

    kernels = attention_kernels(one_micro_batch)
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    params = list(engine.module.parameters())
    return {
        "backend": dist.get_backend(),
        "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(),
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": bool(engine.bfloat16_enabled()),
        "param_dtype": str(
            params[0].ds_tensor.dtype if hasattr(params[0], "ds_tensor") else params[0].dtype
        ),
        "optimizer": f"{type(basic).__module__}.{type(basic).__name__}",
        "attention_kernels": kernels,
        "losses": losses,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }


def probe_checkpointing() -> dict[str, Any]:
    from crucible.model.gpt import build_model, init_weights
    from crucible.model.parallelize import set_activation_checkpointing
    from crucible.model.presets import get_preset

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = get_preset("gpt3-350m")
    model = init_weights(build_model(cfg), seed=0, device="cuda").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 1025), generator=gen).cuda()
    out: dict[str, Any] = {}
    grads: dict[bool, list[torch.Tensor]] = {}
    for enabled in (False, True):
        set_activation_checkpointing(model, enabled)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
        key = "on" if enabled else "off"
        out[f"loss_{key}"] = float(loss)
        out[f"peak_bytes_{key}"] = torch.cuda.max_memory_allocated() - base
        grads[enabled] = [p.grad.detach().float().clone() for p in model.parameters()]
    out["max_grad_abs_diff"] = max(
        float((a - b).abs().max()) for a, b in zip(grads[False], grads[True], strict=True)
    )
    out["max_grad_abs"] = max(float(g.abs().max()) for g in grads[False])
    return out


if __name__ == "__main__":
    result = {"engine": probe_engine, "checkpointing": probe_checkpointing}[sys.argv[1]]()
    print(json.dumps(result))
