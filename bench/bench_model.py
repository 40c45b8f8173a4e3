"""Forward+backward throughput of crucible's GPT against a minimal reference GPT.

The reference is a GPT-2 written the simplest way (explicit q·kᵀ, mask, softmax, ·v; one
Linear per projection; nothing fused), with the same shapes and dtype. Both run in this
process, interleaved step by step so that a noisy, shared machine slows both alike; the
fastest step of each (least disturbed by other load, as timeit advises) gives tokens/s and
the ratio. On a GPU with a known peak, MFU uses
crucible's own ``model_flops_per_token`` (6N + 12LHQT).

    python bench/bench_model.py            # ~5 min on 2 CPU cores
    python bench/bench_model.py --quick    # ~30 s
    python bench/bench_model.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from crucible.model.accounting import model_flops_per_token, num_params
from crucible.model.config import ModelConfig
from crucible.model.gpt import build_model, init_weights
from crucible.model.presets import get_preset

# bf16 dense peaks (ANCHORS.md), matched against torch.cuda.get_device_name().
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class RefBlock(nn.Module):
    """Textbook pre-norm GPT-2 block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.ln1(x)
        q, k, v = (
            f(h).view(B, T, self.n_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    """Minimal GPT-2: embeddings, blocks, final norm, tied head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.size(1), device=tokens.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def _step(fn, tokens: torch.Tensor, params: list[nn.Parameter], device: str) -> float:
    start = time.perf_counter()
    loss = fn(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    for p in params:
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_case(
    name: str, cfg: ModelConfig, batch: int, seq: int, steps: int, device: str, dtype: torch.dtype
) -> dict:
    """Fastest forward+backward time of crucible's GPT and the reference on one shape."""
    ours = init_weights(build_model(cfg, device="meta"), seed=0, device=device).to(dtype).train()
    ref = RefGPT(cfg).to(device=device, dtype=dtype).train()
    assert sum(p.numel() for p in ref.parameters()) == num_params(cfg)  # same shapes
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    runs = {
        "crucible": (lambda x, y: ours(x, y)[1], list(ours.parameters())),
        "reference": (ref, list(ref.parameters())),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(steps + 2):  # two warm-up steps, interleaved
        for key, (fn, params) in runs.items():
            t = _step(fn, tokens, params, device)
            if i >= 2:
                times[key].append(t)
    best = {k: min(v) for k, v in times.items()}
    row = dict(case=name, params=num_params(cfg), batch=batch, seq=seq)
    row |= {f"{k}_tok_s": batch * seq / t for k, t in best.items()}
    row["ratio"] = best["reference"] / best["crucible"]
    peak = next(
        (
            v
            for k, v in PEAK_FLOPS.items()
            if device == "cuda" and k in torch.cuda.get_device_name()
        ),
        None,
    )
    if peak is not None:
        row["mfu"] = row["crucible_tok_s"] * model_flops_per_token(cfg, seq) / peak
    return row


def main() -> None:
    """Run the cases and print a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller shapes (~30 s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    steps = 5 if args.quick else 8
    cases = [("tiny", get_preset("tiny"), 16, 128)]
    gpt2 = get_preset("gpt2-small")
    if args.quick:
        cases.append(("gpt2-small, 1 layer", gpt2.model_copy(update={"n_layers": 1}), 2, 256))
    else:
        cases.append(("gpt2-small, 4 layers", gpt2.model_copy(update={"n_layers": 4}), 2, 512))
        cases.append(("gpt2-small", gpt2, 1, 1024))
    if args.device == "cuda":
        cases = [(n, c, b * 8, s) for n, c, b, s in cases]
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} steps={steps}"
    )
    header = f"{'case':<22}{'params':>12}{'B×T':>10}{'crucible tok/s':>16}{'reference tok/s':>17}{'ratio':>8}"
    print(header)
    for name, cfg, b, s in cases:
        r = bench_case(name, cfg, b, s, steps, args.device, dtype)
        line = f"{name:<22}{r['params']:>12,}{f'{b}×{s}':>10}{r['crucible_tok_s']:>16,.0f}"
        line += f"{r['reference_tok_s']:>17,.0f}{r['ratio']:>7.2f}x"
        if "mfu" in r:
            line += f"  MFU {r['mfu']:.1%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
