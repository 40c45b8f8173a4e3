"""Quantised export for PyTorch: torchao int8 weight-only against the fp32 and bf16 models
they come from, side by side in one process.

For each format: the file size (``torch.save`` of the state dict; torchao's file as
``crucible export --format torchao`` writes it), the held-out perplexity over a shard split
(given a trained checkpoint; a random model's perplexity says nothing), and generation speed
on this CPU: one prompt of 16 tokens, 64 new tokens greedily with the KV cache, median of
``--rounds`` timed runs after one warm-up, torch on ``--threads`` threads. Formats alternate
in each round, so the machine's load falls on all of them alike; speeds are also given as a
ratio to fp32.

Run: ``.venv/bin/python bench/bench_torchao.py [--preset gpt1] [--checkpoint RUN]
[--rounds 5] [--threads 2] [--out bench/results]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from crucible.model.generate import generate
from crucible.model.gpt import GPT, build_model, init_weights
from crucible.model.spec import resolve_model
from crucible.model.torchao_export import load_quantized, quantize, save_quantized


def variants(model: GPT, tmp: Path) -> dict[str, tuple[GPT, int]]:
    """fp32 and bf16 copies of ``model``, and int8 ones from each (``crucible export --format
    torchao --dtype fp32|bf16``: activations, embeddings and scales in that dtype), with their
    file sizes."""
    out: dict[str, tuple[GPT, int]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = build_model(model.cfg, device="cpu")
        m.load_state_dict(model.state_dict())
        m = m.to(dtype).eval()
        path = tmp / f"{name}.pt"
        torch.save(m.state_dict(), path)
        out[name] = (m, path.stat().st_size)
    for name, dtype in (("int8", torch.float32), ("int8-bf16", torch.bfloat16)):
        m = build_model(model.cfg, device="cpu")
        m.load_state_dict(model.state_dict())
        path = save_quantized(quantize(m.to(dtype).eval()), tmp / f"{name}.pt", "int8")
        out[name] = (load_quantized(path), path.stat().st_size)
    return out


def tokens_per_s(model: GPT, rounds: int, new: int = 64) -> float:
    prompt = [list(range(1, 17))]
    generate(model, prompt, 4)  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        generate(model, prompt, new)
        times.append(time.perf_counter() - t)
    return new / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt1", help="model for size and speed (random init)")
    ap.add_argument("--checkpoint", help="a trained run/checkpoint for perplexity too")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"command": "python bench/bench_torchao.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "torch": torch.__version__}  # fmt: skip
    import torchao

    result["torchao"] = torchao.__version__
    with tempfile.TemporaryDirectory() as d:
        model = init_weights(build_model(resolve_model(args.preset), device="cpu"), seed=0)
        vs = variants(model.eval(), Path(d))
        speed: dict[str, list[float]] = {k: [] for k in vs}
        for _ in range(args.rounds):
            for name, (m, _) in vs.items():
                with torch.no_grad():
                    speed[name].append(tokens_per_s(m, 1))
        rows = {name: {"bytes": size, "tokens_per_s": statistics.median(speed[name])}
                for name, (_, size) in vs.items()}  # fmt: skip
        for r in rows.values():
            r["speed_vs_fp32"] = r["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
            r["size_vs_fp32"] = r["bytes"] / rows["fp32"]["bytes"]
        result[args.preset] = rows
        if args.checkpoint:
            from crucible.jobs.evaluation import perplexity
            from crucible.jobs.runs import load_train_spec
            from crucible.jobs.train.export import load_model, resolve_checkpoint

            path = resolve_checkpoint(args.checkpoint)
            trained = load_model(path)
            shards = load_train_spec(path.parent.parent).data.shards
            tv = variants(trained, Path(d))
            result["checkpoint"] = {
                "path": str(path),
                **{name: {"bytes": size, **perplexity(m, shards, "heldout", 8, None, False)}
                   for name, (m, size) in tv.items()},
            }  # fmt: skip
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"torchao_cpu_{date.today()}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
