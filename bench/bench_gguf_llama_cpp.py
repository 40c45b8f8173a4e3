"""GGUF export checked by llama.cpp itself: the files ``crucible export --format gguf`` writes,
loaded by llama.cpp's Python bindings (``llama-cpp-python``), against crucible's fp32 model
in the same process.

For each model and quantisation: the file size; the held-out perplexity llama.cpp computes
from its own logits over the first ``--rows`` rows of the shards' held-out split, beside
crucible's; how many of 32 greedy tokens llama.cpp decodes exactly as crucible does (from a
16-token prompt of each of the first 8 held-out rows; after the first difference the two
continue from different text, so the count stops there); and llama.cpp's decoding speed (64
tokens, median of ``--rounds``). Two models: the demo's trained GPT-2-style model (llama.cpp
architecture ``gpt2``) and a randomly initialised LLaMA-style one (``llama``: rotary rows
permuted for llama.cpp), so that both architectures' layouts are exercised. k-quants
(``q6_k``, ``q4_k_m``) are made by llama.cpp's quantiser from crucible's f16 file, as
``llama-quantize`` would; tensors whose rows are not whole 256-value blocks keep another
type there (llama.cpp's choice).

llama-cpp-python has no wheel for this machine; build it once from its source distribution
(``pip install llama-cpp-python``: it compiles llama.cpp, about 15 minutes on 2 cores). It is
not a dependency of crucible.

Run: ``.venv/bin/python bench/bench_gguf_llama_cpp.py [--checkpoint demo/runs/demo-train]
[--quants f32 f16 q8_0 q5_0 q4_0 q6_k q4_k_m] [--rows 32] [--rounds 3] [--out bench/results]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.jobs.runs import load_run_spec
from crucible.jobs.train.export import load_model
from crucible.model.generate import generate
from crucible.model.gguf import write_gguf
from crucible.model.gpt import GPT, build_model, init_weights
from crucible.model.presets import get_preset

PROMPT, NEW, SPEED_TOKENS = 16, 32, 64


def crucible_nll(model: GPT, rows: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of ``rows`` under crucible's model."""
    x = torch.from_numpy(rows.astype(np.int64))
    with torch.no_grad():
        _, loss = model(x[:, :-1], x[:, 1:])
    assert loss is not None
    return float(loss)


def llama_nll(llm: Any, rows: np.ndarray) -> float:
    """The same from llama.cpp's logits (``logits_all``), one row at a time."""
    total, count = 0.0, 0
    for row in rows:
        llm.reset()
        llm.eval(row[:-1].tolist())
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        total -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return total / count


def llama_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` tokens llama.cpp decodes greedily after ``prompt`` (no BOS added: token ids in)."""
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def llama_quantize(src: Path, dst: Path, quant: str) -> None:
    """What ``llama-quantize src dst Q4_K_M`` does, through the bindings' C API."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {quant}")


def agreement(ours: list[int], theirs: list[int]) -> int:
    """Tokens equal from the start, up to the first difference."""
    n = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        n += 1
    return n


def bench_model(
    label: str, model: GPT, tok: Any, eos: int, rows: np.ndarray, quants: list[str],
    rounds: int, tmp: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    from llama_cpp import Llama

    prompts = [r[:PROMPT].tolist() for r in rows[:8]]
    ours = [
        generate(model, [p], max_new_tokens=NEW, temperature=0.0)[0] for p in prompts
    ]  # fmt: skip
    ref_ppl = math.exp(crucible_nll(model, rows))
    out = []
    for quant in quants:
        path = tmp / f"{label.split()[0]}-{quant}.gguf"
        if quant in K_QUANTS:  # llama.cpp's own quantiser, from crucible's f16 file
            f16 = tmp / f"{label.split()[0]}-f16.gguf"
            if not f16.exists():
                write_gguf(model, f16, "f16", tok, eos, name=label)
            llama_quantize(f16, path, quant)
        else:
            write_gguf(model, path, quant, tok, eos, name=label)
        llm = Llama(model_path=str(path), n_ctx=model.cfg.max_seq_len, n_batch=rows.shape[1],
                    n_threads=2, logits_all=True, verbose=False)  # fmt: skip
        ppl = math.exp(llama_nll(llm, rows))
        same = [agreement(o, llama_greedy(llm, p, NEW)) for o, p in zip(ours, prompts, strict=True)]
        speeds = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            llama_greedy(llm, prompts[0], SPEED_TOKENS)
            speeds.append(SPEED_TOKENS / (time.perf_counter() - t0))
        out.append({
            "model": label, "quant": quant, "bytes": path.stat().st_size,
            "perplexity_llama_cpp": round(ppl, 4), "perplexity_crucible_fp32": round(ref_ppl, 4),
            "greedy_tokens_equal": f"{sum(same)}/{NEW * len(prompts)}",
            "llama_cpp_tokens_per_s": round(statistics.median(speeds), 1),
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
        del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="demo/runs/demo-train")
    ap.add_argument(
        "--quants", nargs="+", default=["f32", "f16", "q8_0", "q5_0", "q4_0", "q6_k", "q4_k_m"]
    )
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(2)

    trained = load_model(args.checkpoint)
    shards = load_run_spec(args.checkpoint).data.shards  # type: ignore[union-attr]
    manifest = read_manifest(shards)
    tok = load_tokenizer(f"{shards}/{manifest.tokenizer.file}")
    eos = manifest.tokenizer.eos_id
    reader = TrainingReader(shards, 1, split="heldout", doc_index=False)
    rows, _ = reader.view.rows(np.arange(min(args.rows, reader.num_samples)))
    cfg = get_preset("debug").model_copy(update={"vocab_size": trained.cfg.vocab_size,
                                                  "max_seq_len": trained.cfg.max_seq_len})  # fmt: skip
    llama = init_weights(build_model(cfg), seed=0).eval()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in [("demo gpt2 (trained)", trained), ("debug llama (random)", llama)]:
            results += bench_model(
                label, model, tok, eos, rows, args.quants, args.rounds, Path(tmp)
            )
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"gguf_llama_cpp_cpu_{date.today()}.json"
    dest.write_text(json.dumps(results, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
