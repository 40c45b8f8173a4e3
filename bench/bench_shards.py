"""Benchmark: tokenize+pack vs raw `tokenizers` batch encoding; TrainingReader vs plain pyarrow.

Both comparisons run side by side in one process on the same data; the figures that matter
are the ratios (goal ≥ 0.9 each). Tokenization runs on one core (TOKENIZERS_PARALLELISM=false)
so the figure is per core. The corpus is real text found on this machine: the Python standard
library sources and the documentation files of installed packages.

    python bench/bench_shards.py [--mbytes 4] [--seq-len 2048] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers loads: one core

import argparse
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.spec import ShardSpec, TokenizerTrainSpec
from crucible.data_pipeline.tokens.pack import PackStats, encode_and_pack
from crucible.data_pipeline.tokens.tokenizer import eos_id, train_tokenizer
from crucible.data_pipeline.training_reader import TrainingReader


def corpus(mbytes: float) -> list[str]:
    """Documents of 1–8 KiB cut from real text files, up to ``mbytes`` MB in all."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = sorted(
        p for r in roots for p in r.rglob("*") if p.suffix in {".py", ".md", ".rst", ".txt"}
    )
    rng = np.random.default_rng(0)
    docs, total = [], 0
    for f in files:
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        while text and total < mbytes * 1e6:
            n = int(rng.integers(1024, 8192))
            docs.append(text[:n])
            total += len(text[:n].encode())
            text = text[n:]
        if total >= mbytes * 1e6:
            break
    return docs


def best_of(repeats: int, *fns) -> list[float]:
    """The shortest of ``repeats`` timed runs of each of ``fns`` (seconds), runs interleaved
    so that load from other processes on the machine hits both sides alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def bench_tokenize(docs: list[str], tok, seq_len: int, batch: int, repeats: int) -> None:
    """Per encode batch, raw and ours run back to back; each side keeps its best time per
    batch over ``repeats`` rounds (robust to bursts of load on a shared machine)."""
    ids = [f"d{i}" for i in range(len(docs))]
    batches = [(ids[i : i + batch], docs[i : i + batch]) for i in range(0, len(docs), batch)]
    eos = eos_id(tok, "<|endoftext|>")
    tok.encode_special_tokens = True  # as packing encodes: special-token text stays text
    n_tokens = [0] * len(batches)

    def raw(k: int) -> None:
        n_tokens[k] = sum(
            len(e.ids) for e in tok.encode_batch_fast(batches[k][1], add_special_tokens=False)
        )

    def ours(k: int) -> None:
        for _ in encode_and_pack(tok, [batches[k]], seq_len, eos, pa.uint16(), PackStats()):
            pass

    raw(0)  # warm up both
    ours(0)
    t_raw = t_ours = 0.0
    for k in range(len(batches)):
        a, b = best_of(repeats, lambda k=k: raw(k), lambda k=k: ours(k))
        t_raw, t_ours = t_raw + a, t_ours + b
    n = sum(n_tokens)
    print(
        f"tokenize   {len(docs):,} docs, {n:,} tokens, one core, {len(batches)} batches of {batch}"
    )
    print(f"  raw tokenizers encode_batch_fast + ids : {n / t_raw / 1e6:7.3f} M tokens/s")
    print(f"  crucible encode_and_pack (rows, bounds): {n / t_ours / 1e6:7.3f} M tokens/s")
    print(f"  ratio crucible / raw                   : {t_raw / t_ours:7.3f}  (goal ≥ 0.9)")


def bench_reader(shards: Path, gbs: int, steps: int, repeats: int) -> None:
    reader = TrainingReader(shards, gbs, verify="size")
    m = reader.manifest
    files = [shards / s.file for s in m.splits["train"].shards]
    table = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files])
    L = m.row_len
    steps = min(steps, reader.num_samples // gbs)
    plan = [reader.global_batch_indices(b) for b in range(steps)]

    def plain() -> None:  # the same samples, memory-mapped, taken with pyarrow
        for idx in plan:
            rows = table.take(pa.array(idx)).column("tokens").combine_chunks().flatten()
            t = torch.from_numpy(rows.to_numpy().reshape(len(idx), L).astype(np.int64))
            _x, _y = t[:, :-1], t[:, 1:]

    def ours() -> None:
        reader.samples_consumed = 0
        for _ in range(steps):
            reader.next_batch()

    plain()
    ours()
    t_plain, t_ours = best_of(repeats, plain, ours)
    n = steps * gbs
    print(
        f"reader     {reader.num_samples:,} samples of {L} tokens ({m.token_dtype}), {steps} batches of {gbs}"
    )
    print(f"  plain pyarrow take → torch (inputs, labels)       : {n / t_plain:10,.0f} samples/s")
    print(f"  TrainingReader.next_batch (+ label mask, doc_index): {n / t_ours:10,.0f} samples/s")
    print(
        f"  ratio reader / pyarrow                            : {t_plain / t_ours:7.3f}  (goal ≥ 0.9)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=4.0, help="corpus size (MB of UTF-8 text)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=256, help="documents per encode_batch call")
    ap.add_argument("--gbs", type=int, default=32, help="reader global batch size")
    ap.add_argument("--steps", type=int, default=200, help="reader batches per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    docs = corpus(args.mbytes)
    tok = train_tokenizer(docs, TokenizerTrainSpec(vocab_size=args.vocab, sample_docs=2000))
    bench_tokenize(docs, tok, args.seq_len, args.batch, args.repeats)

    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        (work / "documents").mkdir()
        n = len(docs)
        pq.write_table(
            pa.table({"id": [f"d{i}" for i in range(n)], "text": docs}),
            work / "documents" / "part-00000.parquet",
        )
        (work / "documents" / "_SUCCESS").touch()
        spec = ShardSpec.model_validate(
            {"seq_len": args.seq_len, "rows_per_shard": 256, "heldout_fraction": 0.0,
             "tokenizer": {"train": {"vocab_size": args.vocab, "sample_docs": 2000}}}
        )  # fmt: skip
        t0 = time.perf_counter()
        m = build_shards(work / "documents", spec, work / "shards", LocalExecutor(), "bench")
        dt = time.perf_counter() - t0
        print(f"build      build_shards local end to end (train tokenizer, pack, shuffle, write, sha256): "
              f"{m.totals.document_tokens / dt / 1e6:.3f} M tokens/s, {m.totals.rows:,} rows")  # fmt: skip
        bench_reader(work / "shards", args.gbs, args.steps, args.repeats)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
