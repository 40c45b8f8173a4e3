"""Supervised fine-tuning: crucible's ``kind: finetune`` against Hugging Face TRL's
``SFTTrainer``, on the same base model, the same conversations and the same batches.

Setup (once): the "reverse these words" task (``demo_task.write_task``), chat shards of it
(template ``plain``, seq_len 128: rows of 129 tokens, examples packed whole, with a loss
mask), and a base model: the ``tiny`` preset pretrained briefly on word text, saved as a
Hugging Face GPT-2 directory with the shards' ``tokenizer.json``.

Each comparison, for full fine-tuning and for LoRA (rank 8, alpha 16 on the attention's qkv
and every output projection: crucible's ``qkv``/``proj``, GPT-2's ``c_attn``/``c_proj``):

* crucible: a finetune run under ``python -m crucible.jobs.train.standalone`` (torchrun,
  DeepSpeed ZeRO-3 on gloo, fp32), ``--nproc`` ranks of one thread each;
* TRL: ``SFTTrainer`` on the CPU in fp32, given the examples of crucible's training split as
  token ids and completion masks (so both train on identical tokens and targets), packed
  best-fit into rows of 129 tokens (TRL's ``bfd`` packing, which trains padding-free: a
  micro-batch is one flattened sequence, position ids restarting per example), under
  torchrun with as many processes of one thread each (DDP on gloo).

Both take 8 rows per optimizer step in micro-batches of 4, AdamW (0.9, 0.95), lr 3e-3 after
20 warm-up steps, no weight decay, gradient clipping at 1. Figures are over the steady
state, from the end of step ``WARMUP`` to the end of the last step (data loading, optimizer
and logging included; start-up and the final checkpoint save not): real (non-padding) input
tokens per second of wall time, and per CPU-second of the run's whole process tree (sampled
every 0.1 s; on a shared machine, wall time measures the other load as much as the run).
Even rounds run crucible first, odd rounds TRL first; ratios are crucible / TRL per pair.

Run: ``.venv/bin/python bench/bench_sft.py [--steps 100] [--rounds 2] [--nproc 1 2]
[--modes full lora] [--out bench/results]``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with"]
WARMUP = 5  # steps left out of the steady-state rate (allocations, first collectives)
SEQ_LEN = 128
GLOBAL_BATCH, MICRO_BATCH = 8, 4
OPTIM = {"lr": 3e-3, "warmup_steps": 20, "schedule": "constant", "weight_decay": 0.0,
         "betas": [0.9, 0.95], "grad_clip": 1.0}  # fmt: skip
LORA = {"rank": 8, "alpha": 16.0, "target_modules": ["qkv", "proj"]}
HF_LORA_TARGETS = ["c_attn", "c_proj"]  # the same layers in GPT-2's names
OFF = {"enabled": False}
PRETRAIN_STEPS = 50  # the base has seen the words; its quality does not change the speed


def make_task(root: Path) -> dict[str, Path]:
    """The chat shards of the task and the base model (an HF directory) that both sides use."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from crucible.data_pipeline.executors.local import LocalExecutor
    from crucible.data_pipeline.pipeline import run_pipeline
    from crucible.data_pipeline.shards.build import build_shards
    from crucible.data_pipeline.shards.spec import ShardSpec
    from crucible.data_pipeline.spec import DataSpec
    from crucible.data_pipeline.training_reader import TrainingReader
    from crucible.jobs.finetune.demo_task import write_task
    from crucible.model.gpt import build_model, init_weights
    from crucible.model.hf import to_hf
    from crucible.model.spec import resolve_model

    # Pretraining text: the tokenizer (320 ids, trained here) and the base's first steps.
    docs = root / "pretrain" / "documents"
    docs.mkdir(parents=True)
    rng = random.Random(0)
    ids = [f"doc{i}" for i in range(120)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 40, 200, 900]))) for _ in ids]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    shard_spec = {"seq_len": 64, "rows_per_shard": 200, "heldout_fraction": 0.05,
                  "tokenizer": {"train": {"vocab_size": 320}}}  # fmt: skip
    pre = root / "pretrain" / "shards"
    build_shards(docs, ShardSpec.model_validate(shard_spec), pre, LocalExecutor(), "bench-sft")

    train_file, _ = write_task(root / "task", WORDS, train=3000, heldout=60)
    spec = DataSpec.model_validate(
        {"inputs": [str(train_file)], "reader": {"chat": {"template": "plain"}},
         **{k: OFF for k in ("language", "gopher_repetition", "gopher_quality", "c4",
                             "fineweb", "pii")},
         "dedup": {"minhash": OFF},
         "shards": {"seq_len": SEQ_LEN, "heldout_rows": 8,
                    "tokenizer": {"path": str(pre / "tokenizer.json")}}}
    )  # fmt: skip
    run_pipeline(spec, root / "data", executor="local", progress=False)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the ranks below
    model = init_weights(build_model(resolve_model("tiny"), device="cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reader = TrainingReader(pre, 16)
    for _ in range(PRETRAIN_STEPS):
        b = reader.next_batch()
        _, loss = model(b["input_ids"], b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    base = root / "base"
    to_hf(model).save_pretrained(base)
    shutil.copy(pre / "tokenizer.json", base / "tokenizer.json")
    return {"shards": root / "data" / "shards", "base": base}


def train_examples(shards: Path) -> tuple[list[list[int]], list[list[int]]]:
    """The examples packed into the training split's rows, as (token ids, loss masks):
    exactly what crucible trains on, cut back into conversations."""
    from datasets import load_from_disk

    split = load_from_disk(str(shards / "train"))
    ids, masks = [], []
    for row in split.select_columns(["tokens", "length", "doc_starts", "loss_mask"]):
        ends = [*row["doc_starts"][1:], row["length"]]
        for s, e in zip(row["doc_starts"], ends, strict=True):
            ids.append(row["tokens"][s:e])
            masks.append(row["loss_mask"][s:e])
    return ids, masks


def crucible_tokens(shards: Path, steps: int) -> list[int]:
    """Real (non-padding) input tokens of each of crucible's first ``steps`` global batches,
    replayed with the run's reader (sample order depends on the seed, not the world size)."""
    from crucible.data_pipeline.training_reader import TrainingReader

    reader = TrainingReader(shards, GLOBAL_BATCH, seed=0)
    return [int((reader.next_batch()["doc_index"] >= 0).sum()) for _ in range(steps)]


class TreeMonitor:
    """Samples a process tree every ``period_s``: its CPU time (user + system, summed over
    the live processes) against wall time, and its resident memory (the largest sum over the
    tree and the largest single process)."""

    def __init__(self, pid: int, period_s: float = 0.1) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float]] = []  # (unix time, tree CPU seconds)
        self.peak_rss = self.peak_rss_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.wait(self.period_s):
            cpu, rss = 0.0, []
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        rss.append(p.memory_info().rss)
                    cpu += t.user + t.system
                except psutil.Error:
                    pass
            self.samples.append((time.time(), cpu))
            self.peak_rss = max(self.peak_rss, sum(rss))
            self.peak_rss_process = max(self.peak_rss_process, max(rss, default=0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_between(self, t0: float, t1: float) -> float:
        """The tree's CPU seconds from ``t0`` to ``t1`` (interpolated between samples)."""
        import numpy as np

        t, c = np.array(self.samples).T
        return float(np.interp(t1, t, c) - np.interp(t0, t, c))


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[TreeMonitor, float]:
    """Run ``cmd`` to the end, monitored; return the monitor and the launch's unix time.
    Exit with the command's log if it fails."""
    with log.open("w") as f:
        launched = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        mon = TreeMonitor(proc.pid)
        code = proc.wait()
        mon.stop()
    if code:
        sys.exit(f"{' '.join(cmd[:6])} ... failed (exit {code}); its output: {log}")
    return mon, launched


def figures(
    times: list[float], tokens: list[int], mon: TreeMonitor, launched: float
) -> dict[str, Any]:
    """Steady-state figures from each step's end time and real input tokens: tokens/s and
    tokens per CPU-second from the end of step WARMUP to the end of the last step."""
    t0, t1 = times[WARMUP - 1], times[-1]
    n = sum(tokens[WARMUP:])
    return {
        "tokens_per_s": n / (t1 - t0),
        "tokens_per_cpu_s": n / mon.cpu_between(t0, t1),
        "cores_busy": mon.cpu_between(t0, t1) / (t1 - t0),
        "median_step_s": median(b - a for a, b in itertools.pairwise(times[WARMUP - 1 :])),
        "first_step_end_s": times[0] - launched,
        "peak_rss_bytes": mon.peak_rss,
        "peak_rss_largest_process_bytes": mon.peak_rss_process,
        "load_1min_after": os.getloadavg()[0],
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_crucible(
    task: dict[str, Path], work: Path, name: str, mode: str, nproc: int, steps: int
) -> dict[str, Any]:
    """One finetune run under the standalone launcher; its steady-state figures."""
    from crucible.cluster.storage import read_jsonl
    from crucible.jobs.runs import prepare_run
    from crucible.jobs.spec import parse_spec

    data: dict[str, Any] = {
        "kind": "finetune",
        "name": name,
        "base": {"hf": str(task["base"])},
        "model": {"parallel": {"precision": "fp32"}},
        "data": {"shards": str(task["shards"])},
        "optim": OPTIM | {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
        "checkpoint": {"every_steps": steps},  # one save, after the last step
        "train": {
            "num_workers": nproc,
            "cpus_per_worker": 1,
            "max_steps": steps,
            "eval_every": 0,
            "spike_window": 0,
        },
        "cluster": {"storage": str(work / "runs")},
    }
    if mode == "lora":
        data["lora"] = LORA
    run = prepare_run(parse_spec(data)).local_path
    cmd = [sys.executable, "-m", "crucible.jobs.train.standalone", str(run), "--nproc", str(nproc)]
    mon, launched = run_measured(cmd, dict(os.environ, OMP_NUM_THREADS="1"), work / f"{name}.log")
    wall = time.time() - launched
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    tokens = crucible_tokens(task["shards"], steps)
    inner = sum(r["step_seconds"] for r in recs[WARMUP:])
    return figures([r["time"] for r in recs], tokens, mon, launched) | {
        # the loop's own measure: batch read to loss, callbacks and logging left out
        "in_step_tokens_per_s": sum(tokens[WARMUP:]) / inner,
        "in_step_row_tokens_per_s": sum(r["tokens"] for r in recs[WARMUP:]) / inner,
        "median_in_step_s": median(r["step_seconds"] for r in recs[WARMUP:]),
        "median_engine_s": median(r["engine_seconds"] for r in recs[WARMUP:]),
        "median_data_wait_s": median(r["data_wait_seconds"] for r in recs[WARMUP:]),
        "final_loss": recs[-1]["loss"],
        "checkpoint_bytes": dir_bytes(run / "checkpoints" / f"step-{steps}"),
        "wall_s": wall,
    }


def trl_worker(task_json: Path, out: Path, mode: str, steps: int) -> None:
    """One rank of TRL's run (under torchrun): SFTTrainer on the shards' examples."""
    import torch

    torch.set_num_threads(1)  # as crucible's ranks (cpus_per_worker 1)
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        PreTrainedTokenizerFast,
        TrainerCallback,
        logging,
    )
    from trl import SFTConfig, SFTTrainer

    logging.set_verbosity_error()
    task = {k: Path(v) for k, v in json.loads(task_json.read_text()).items()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(task["base"] / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    ids, masks = train_examples(task["shards"])
    dataset = Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    model = AutoModelForCausalLM.from_pretrained(
        task["base"], dtype=torch.float32, attn_implementation="sdpa"
    )
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=HF_LORA_TARGETS, bias="none",
                                 task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(
        output_dir=str(out.parent / f"{out.stem}-trl"),
        max_steps=steps,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GLOBAL_BATCH // (MICRO_BATCH * world),
        learning_rate=OPTIM["lr"],
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=OPTIM["warmup_steps"],
        weight_decay=OPTIM["weight_decay"],
        adam_beta1=OPTIM["betas"][0],
        adam_beta2=OPTIM["betas"][1],
        max_grad_norm=OPTIM["grad_clip"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; crucible's is off
        packing=True,
        packing_strategy="bfd",
        max_length=SEQ_LEN + 1,  # crucible's rows: 129 tokens, 128 predictions
        completion_only_loss=True,
        include_num_input_tokens_seen="all",  # padding-free: every input token is real
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        ddp_backend="gloo" if world > 1 else None,
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[int] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.time())
            self.tokens.append(int(state.num_input_tokens_seen))

    timer = Timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         peft_config=peft_config, callbacks=[timer])  # fmt: skip
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    if world == 1 or dist.get_rank() == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        cumulative = [0, *timer.tokens]
        out.write_text(json.dumps({
            "times": timer.ends,
            "tokens": [b - a for a, b in itertools.pairwise(cumulative)],
            "final_loss": losses[-1] if losses else None,
            "trainable": trainable,
            "parameters": total,
            "packed_rows": len(trainer.train_dataset),
            "activation_checkpointing": bool(args.activation_checkpointing),
            "world_size": args.world_size,
        }))  # fmt: skip


def run_trl(
    task_json: Path, work: Path, name: str, mode: str, nproc: int, steps: int
) -> dict[str, Any]:
    """TRL's run: ``nproc`` processes of one thread each under torchrun."""
    with socket.socket() as s:  # a free port: a fixed one collides with a concurrent run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
           "--trl-worker", str(task_json), str(out), mode, "--steps", str(steps)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    mon, launched = run_measured(cmd, env, work / f"{name}.log")
    wall = time.time() - launched
    r = json.loads(out.read_text())
    return figures(r.pop("times"), r.pop("tokens"), mon, launched) | r | {"wall_s": wall}


def crucible_share(task: dict[str, Path]) -> tuple[int, int]:
    """(trainable, all) parameters of crucible's LoRA model."""
    from crucible.jobs.finetune.base import base_config
    from crucible.jobs.finetune.lora import apply_lora, trainable_share
    from crucible.jobs.finetune.spec import BaseSpec, LoraSpec
    from crucible.model.gpt import build_model

    cfg = base_config(BaseSpec(hf=str(task["base"])))
    model = apply_lora(build_model(cfg, device="cpu"), LoraSpec.model_validate(LORA), seed=0)
    return trainable_share(model)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(result: dict[str, Any]) -> str:
    """The figures as Markdown."""
    loads = [p[side]["load_1min_after"] for p in result["pairs"] for side in ("crucible", "trl")]
    lines = [
        f"# SFT on CPU: crucible finetune vs TRL {result['versions']['trl']} SFTTrainer",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; after the runs {min(loads):.1f} to {max(loads):.1f}. "
        f"Whole run {result['total_seconds'] / 60:.0f} min. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + ".",
        "",
        f"Setup: {result['setup']}",
        "",
        "tok/s: real (non-padding) input tokens per second of wall time over the steady state "
        f"(end of step {WARMUP} to end of step {result['steps']}); tok/CPU-s: the same tokens "
        "per CPU-second of the run's whole process tree over that window (less sensitive to "
        "other load on the machine). Ratios: crucible / TRL of the same pair (> 1: crucible "
        "faster). Order: which of the pair ran first. Final loss: crucible's last step; TRL's "
        "mean over its last logging interval (10 steps).",
        "",
        "| mode | ranks | round | order | crucible tok/s | TRL tok/s | ratio | crucible "
        "tok/CPU-s | TRL tok/CPU-s | ratio | final loss crucible / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["pairs"]:
        c, t = p["crucible"], p["trl"]
        lines.append(
            f"| {p['mode']} | {p['nproc']} | {p['round']} | {p['order']} | "
            f"{c['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | {p['ratio']:.2f} | "
            f"{c['tokens_per_cpu_s']:,.0f} | {t['tokens_per_cpu_s']:,.0f} | "
            f"{p['cpu_ratio']:.2f} | {c['final_loss']:.3f} / {t['final_loss']:.3f} |"
        )
    lines += [
        "",
        "| mode | ranks | median ratio tok/s | median ratio tok/CPU-s |",
        "|---|---|---|---|",
    ]
    for k, v in result["median_ratio"].items():
        mode, nproc = k.split("/")
        lines.append(
            f"| {mode} | {nproc} | {v['tokens_per_s']:.2f} | {v['tokens_per_cpu_s']:.2f} |"
        )
    lines += [
        "",
        "Memory and start-up (medians over rounds): peak RSS summed over the run's process "
        "tree (launcher included) and of its largest process; seconds from launch to the end "
        "of the first step.",
        "",
        "| mode | ranks | crucible peak RSS MiB (largest) | TRL peak RSS MiB (largest) | "
        "crucible first step s | TRL first step s |",
        "|---|---|---|---|---|---|",
    ]
    for k in result["median_ratio"]:
        mode, nproc = k.split("/")
        ps = [p for p in result["pairs"] if (p["mode"], str(p["nproc"])) == (mode, nproc)]

        def med(side: str, key: str, ps: list[dict[str, Any]] = ps) -> float:
            return median(p[side][key] for p in ps)

        lines.append(
            f"| {mode} | {nproc} | {mib(med('crucible', 'peak_rss_bytes'))} "
            f"({mib(med('crucible', 'peak_rss_largest_process_bytes'))}) | "
            f"{mib(med('trl', 'peak_rss_bytes'))} "
            f"({mib(med('trl', 'peak_rss_largest_process_bytes'))}) | "
            f"{med('crucible', 'first_step_end_s'):.0f} | {med('trl', 'first_step_end_s'):.0f} |"
        )
    lines.append("")
    share = result["lora_share"]
    if share:
        (ct, ca), (tt, ta) = share["crucible"], share["trl"]
        lines += [
            f"LoRA trainable parameters: crucible {ct:,} of {ca:,} ({ct / ca:.2%}); "
            f"TRL/PEFT {tt:,} of {ta:,} ({tt / ta:.2%}).",
            "",
        ]
    lines += [
        "crucible checkpoint size (the committed step directory, model + optimizer states): "
        + "; ".join(f"{k} {v:,} bytes" for k, v in result["checkpoint_bytes"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def run_pair(
    task: dict[str, Path], task_json: Path, work: Path, mode: str, nproc: int, r: int, steps: int
) -> dict[str, Any]:
    """One crucible run and one TRL run of the same configuration; even rounds start with
    crucible, odd ones with TRL, so drift in the machine's speed hits both sides alike."""
    order = ("crucible", "trl") if r % 2 == 0 else ("trl", "crucible")
    got: dict[str, dict[str, Any]] = {}
    for side in order:
        name = f"{side}-{mode}-{nproc}r-{r + 1}"
        if side == "crucible":
            got[side] = run_crucible(task, work, name, mode, nproc, steps)
        else:
            got[side] = run_trl(task_json, work, name, mode, nproc, steps)
    c, t = got["crucible"], got["trl"]
    pair = {"mode": mode, "nproc": nproc, "round": r + 1, "order": " then ".join(order),
            "ratio": c["tokens_per_s"] / t["tokens_per_s"],
            "cpu_ratio": c["tokens_per_cpu_s"] / t["tokens_per_cpu_s"], **got}  # fmt: skip
    print(
        f"{mode}, {nproc} rank(s), round {r + 1} ({pair['order']}): tok/s crucible "
        f"{c['tokens_per_s']:,.0f}, TRL {t['tokens_per_s']:,.0f} (ratio {pair['ratio']:.2f}); "
        f"tok/CPU-s crucible {c['tokens_per_cpu_s']:,.0f}, TRL {t['tokens_per_cpu_s']:,.0f} "
        f"(ratio {pair['cpu_ratio']:.2f}); final loss {c['final_loss']:.3f} / "
        f"{t['final_loss']:.3f}",
        flush=True,
    )
    return pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="pairs per mode and rank count")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="rank counts")
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--out", type=Path, default=None, help="write sft_cpu_<date>.{json,md} here")
    ap.add_argument("--trl-worker", nargs=3, metavar=("TASK", "OUT", "MODE"),
                    help=argparse.SUPPRESS)  # fmt: skip
    a = ap.parse_args()
    if a.trl_worker:
        trl_worker(Path(a.trl_worker[0]), Path(a.trl_worker[1]), a.trl_worker[2], a.steps)
        return
    if a.steps <= WARMUP + 1:
        sys.exit(f"--steps must exceed {WARMUP + 1} (the first {WARMUP} are warm-up)")
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed JIT-builds its CPU collectives op into torch's extensions cache, keyed by
    # name only: another virtualenv's build of it in the shared default directory would make
    # the ranks rebuild it (minutes) inside the figures' start-up times.
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / f"torch-extensions-{key}")
    )
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()  # built here, once, rather than inside the first run's start-up
    import peft
    import torch
    import transformers
    import trl

    work = Path(tempfile.mkdtemp(prefix="bench-sft-", dir="/tmp"))
    task = make_task(work)
    task_json = work / "task.json"
    task_json.write_text(json.dumps({k: str(v) for k, v in task.items()}))
    print(f"task and base model ready in {work} ({time.perf_counter() - t_start:.0f} s)",
          flush=True)  # fmt: skip

    pairs = [run_pair(task, task_json, work, mode, nproc, r, a.steps)
             for mode in a.modes for nproc in a.nproc for r in range(a.rounds)]  # fmt: skip
    trl_lora = next((p["trl"] for p in pairs if p["mode"] == "lora"), None)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": ".venv/bin/python bench/bench_sft.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, load average {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "setup": (
            f"the tiny preset (GPT-2 architecture) pretrained {PRETRAIN_STEPS} steps; "
            f"{len(train_examples(task['shards'])[0]):,} training conversations (3,000 "
            f"generated, exact duplicates removed) in rows of {SEQ_LEN + 1} tokens; global "
            f"batch {GLOBAL_BATCH} rows in micro-batches of {MICRO_BATCH}; fp32; one thread "
            f"per rank; {a.steps} steps per run, the first {WARMUP} left out."
        ),
        "steps": a.steps,
        "warmup_steps_excluded": WARMUP,
        "pairs": pairs,
        "median_ratio": {
            f"{m}/{n}": {
                k: median(p[key] for p in pairs if (p["mode"], p["nproc"]) == (m, n))
                for k, key in (("tokens_per_s", "ratio"), ("tokens_per_cpu_s", "cpu_ratio"))
            }
            for m in a.modes
            for n in a.nproc
        },
        "lora_share": {
            "crucible": list(crucible_share(task)),
            "trl": [trl_lora["trainable"], trl_lora["parameters"]],
        }
        if trl_lora
        else None,
        "checkpoint_bytes": {
            m: next(p["crucible"]["checkpoint_bytes"] for p in pairs if p["mode"] == m)
            for m in a.modes
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    md = report(result)
    print("\n" + md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        stem = a.out / f"sft_cpu_{result['date']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.json and {stem}.md")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
