"""Training throughput and MFU on one GPU: crucible's train job against a bare DeepSpeed loop
and against the same model in Hugging Face ``transformers`` under DeepSpeed, with the
planner's predictions beside what was measured.

One configuration per process (a fresh CUDA context each, so peak memory is the
configuration's own):

    python bench/bench_gpu.py STACK --preset gpt3-1.3b [--seq 2048] [--mbs 8] [--steps 10]
        [--checkpointing] [--compile] --shards DIR --workdir DIR --out result.json

``crucible``: the train job's own loop and callbacks on shards, under torchrun
(:mod:`crucible.jobs.train.standalone`), stopped after the measured steps through the
graceful stop, without a checkpoint; step times and peak memory from its ``metrics.jsonl``.
``bare``: ``deepspeed.initialize`` + forward/backward/step on crucible's GPT built as the job
builds it, with the same DeepSpeed config, on random tokens; ``bare-det`` the same in the
deterministic mode crucible's ranks run in (so the ratio to it is the loop's own cost). ``hf``: the same model's
``transformers`` class (GPT-2 or Llama, SDPA attention) built under ``deepspeed.zero.Init``
with the same config. Every stack: median step time over the steps after ``WARMUP``, tokens/s,
MFU (model FLOPs 6N + attention, no recomputation, over the catalogue's dense bf16 peak) and
peak allocated memory. ``bench/gpu_check.py`` runs the grid and writes the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WARMUP = 3


def train_spec(args: argparse.Namespace, name: str, storage: str, shards: str) -> Any:
    from crucible.jobs.spec import parse_spec

    return parse_spec({
        "kind": "train", "name": name,
        "cluster": {"storage": storage, "gpu": "h200", "gpus_per_node": 1},
        "model": {"preset": args.preset, "max_seq_len": args.seq,
                  "parallel": {"activation_checkpointing": args.checkpointing,
                               "compile": args.compile}},
        "data": {"shards": shards},
        "optim": {"global_batch_size": args.mbs, "micro_batch_size": args.mbs,
                  "warmup_steps": 2, "lr": 1e-4},
        "checkpoint": {"every_steps": 10**9},
        "train": {"num_workers": 1, "max_steps": 10_000, "log_every": 1},
    })  # fmt: skip


def predicted(spec: Any) -> dict[str, Any]:
    """The planner's figures for this configuration on one H200."""
    from crucible.cluster.plan import plan_from_spec, plan_run

    p = plan_from_spec(spec, alternatives=False)
    run = plan_run(spec, 1, seq_len=spec.model.max_seq_len, use_gpu=True)
    m = run.memory
    return {
        "step_seconds": p.step_seconds,
        "mfu": p.mfu,
        "memory_bytes": m.total_bytes,
        "memory_states_bytes": m.state_bytes,
        "memory_activation_bytes": m.activation_bytes,
        "memory_logits_bytes": m.logits_bytes,
        "max_micro_batch_size": p.max_micro_batch_size,
        "flops_per_token": run.flops_per_token,
        "peak_flops": p.peak_flops,
    }


def summarize(times: list[float], tokens_per_step: int, flops_per_token: float,
              peak_flops: float, peak_bytes: int) -> dict[str, Any]:  # fmt: skip
    steady = times[WARMUP:] or times
    step = statistics.median(steady)
    return {
        "step_seconds": step,
        "steps_measured": len(steady),
        "tokens_per_s": tokens_per_step / step,
        "mfu": tokens_per_step * flops_per_token / step / peak_flops,
        "peak_memory_bytes": peak_bytes,
    }


def run_crucible(args: argparse.Namespace) -> dict[str, Any]:
    """The train job's loop under torchrun, stopped by request after the measured steps."""
    from crucible.jobs.runs import prepare_run, stop_request

    spec = train_spec(args, f"bench-{args.preset}-{os.getpid()}", args.workdir, args.shards)
    run = prepare_run(spec)
    run_dir = Path(run.path)
    want = WARMUP + args.steps
    proc = subprocess.Popen(
        [sys.executable, "-m", "crucible.jobs.train.standalone", str(run_dir), "--nproc", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    asked = False
    while proc.poll() is None:
        if not asked and metrics.is_file():
            steps = [ln for ln in metrics.read_text().splitlines() if '"kind": "step"' in ln]
            if len(steps) >= want:  # the run's own progress ends it
                stop_request(run).write_json({"checkpoint": False, "at": time.time()})
                asked = True
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"train job failed ({proc.returncode}):\n{out[-4000:]}")
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    pred = predicted(spec)
    result = summarize([r["step_seconds"] for r in steps], steps[0]["tokens"],
                       pred["flops_per_token"], pred["peak_flops"],
                       max(r.get("device_memory_peak_bytes", 0) for r in steps))  # fmt: skip
    reported = [r["mfu"] for r in steps[WARMUP:] if r.get("mfu") is not None]
    result["mfu_reported"] = statistics.median(reported) if reported else None
    result["engine_share"] = statistics.median(
        r["engine_seconds"] / r["step_seconds"] for r in steps[WARMUP:]
    )
    return result | {"predicted": pred}


def _init_single_rank() -> bool:
    """One rank's process group (NCCL on the GPU; gloo where there is none, to try the
    script on a CPU); whether it is on the GPU."""
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    from crucible.jobs.train.environment import prepare_process

    gpu = torch.cuda.is_available()
    prepare_process(use_gpu=gpu)
    import deepspeed

    if gpu:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    return gpu


def run_direct(args: argparse.Namespace) -> dict[str, Any]:
    """A bare DeepSpeed loop over crucible's GPT or over the ``transformers`` model."""
    gpu = _init_single_rank()
    import deepspeed
    import torch

    sync = torch.cuda.synchronize if gpu else (lambda: None)

    from crucible.model.parallelize import build_zero3_model, parallelize

    spec = train_spec(args, "bench", args.workdir, args.shards)
    if args.stack == "bare-det":
        from crucible.jobs.train.state import make_deterministic

        make_deterministic(int(spec.train.cpus_per_worker))
    pred = predicted(spec)
    from crucible.cluster.plan import plan_run

    ds_config = plan_run(spec, 1, seq_len=args.seq, use_gpu=gpu).ds_config
    cfg = spec.model.resolve()
    if args.stack.startswith("bare"):
        model = parallelize(build_zero3_model(cfg, ds_config), spec.model.parallel)
    else:
        # transformers imports torch._dynamo lazily; inside zero.Init, which patches
        # torch.Tensor.__new__, dynamo's import-time signature check of it fails.
        import torch._dynamo
        from transformers import AutoModelForCausalLM

        from crucible.model.hf import hf_config

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="sdpa")
        if args.checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(WARMUP + args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (args.mbs, args.seq + 1), generator=gen)
        tokens = tokens.to(engine.device)
        sync()
        t0 = time.perf_counter()
        if args.stack.startswith("bare"):
            _, loss = engine(tokens[:, :-1], tokens[:, 1:])
        else:  # transformers shifts the labels itself
            loss = engine(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    result = summarize(times, args.mbs * args.seq, pred["flops_per_token"], pred["peak_flops"],
                       torch.cuda.max_memory_allocated() if gpu else 0)  # fmt: skip
    return result | {"predicted": pred}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stack", choices=["crucible", "bare", "bare-det", "hf"])
    ap.add_argument("--preset", default="gpt3-1.3b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=8, help="sequences per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=10, help="measured steps after the warm-up")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--shards", required=True, help="shards with rows of at least --seq tokens")
    ap.add_argument("--workdir", required=True, help="where the crucible stack's run goes")
    ap.add_argument("--out", required=True, help="the result's JSON file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = run_crucible(args) if args.stack == "crucible" else run_direct(args)
    result |= {"stack": args.stack, "preset": args.preset, "seq": args.seq, "mbs": args.mbs,
               "checkpointing": args.checkpointing, "compile": args.compile,
               "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
