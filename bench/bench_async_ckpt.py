"""Asynchronous checkpoint saves (``checkpoint.async_save``) against synchronous ones.

1. Blocked time per save: under ``torchrun`` (``--nproc`` ranks, gloo on CPUs, NCCL on GPUs)
   the preset's engine takes one optimizer step (so Adam's states exist), then rounds
   alternate a synchronous save (the loop is blocked for all of it) and an asynchronous one,
   followed as in the train loop by the next step: blocked while DeepSpeed builds the state
   dicts, then the forward and backward run while the save copies the state to host memory,
   and the optimizer step waits for what is left of the copy (that wait is blocked time
   too); the background write is timed to its commit. Goal: the median asynchronous blocked
   time <= 10% of the synchronous save.
2. A run: the train job's own loop (the standalone launcher, no Ray) for ``--steps`` steps with
   a checkpoint every ``--every``, once with synchronous and once with asynchronous saves: the
   loop's blocked time per save (``metrics.jsonl``'s ``blocked_seconds``) and the run's time
   from the start of its first step to the commit of its last checkpoint.

Run: ``python bench/bench_async_ckpt.py [--preset gpt1] [--nproc 2] [--rounds 3]
[--steps 8] [--every 2] [--seq-len 64] [--precision bf16|fp32] [--part saves|run|both]
[--out results.json]``.
On CPUs the write competes with training for the same cores, so part 2's run time measures
that contention as much as the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def save_worker(spec_path: Path, out: Path, rounds: int) -> None:
    """One rank of part 1 (run under torchrun)."""
    import torch

    from crucible.jobs.train.environment import prepare_process

    gpu = torch.cuda.is_available()
    prepare_process(gpu)
    import deepspeed
    import torch.distributed as dist
    import yaml

    from crucible.cluster.plan import plan_run
    from crucible.cluster.storage import location
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.checkpoint.async_save import AsyncSaver
    from crucible.jobs.train.engine import build_engine
    from crucible.jobs.train.state import make_deterministic

    make_deterministic(1)
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    plan = plan_run(spec, world, seq_len=64, use_gpu=gpu)
    engine = build_engine(spec, plan)
    vocab = spec.model.resolve().vocab_size
    ids = torch.randint(0, vocab, (plan.micro_batch_size, 65), generator=torch.Generator())
    ids = ids.to(engine.device)
    _, loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    root = location(out.parent / "ckpt")
    root.mkdirs()
    saver = AsyncSaver(root, rank, world, pinned=gpu)
    rows = []
    step = 0
    for _ in range(rounds):
        step += 1
        dist.barrier()
        t0 = time.perf_counter()
        stats = ckpt.save(engine, root, step, {"step": step}, rank, world)
        sync_s = time.perf_counter() - t0
        if rank == 0:
            ckpt.retain(root, 1, None)
        step += 1
        dist.barrier()
        t0 = time.perf_counter()
        saver.start(engine, step, {"step": step})
        snapshot = time.perf_counter() - t0
        _, loss = engine(ids[:, :-1], ids[:, 1:])  # the next step overlaps the copy
        engine.backward(loss)
        staging_wait = saver.wait_staged()
        engine.step()
        blocked = snapshot + staging_wait
        done = saver.wait()
        assert done is not None
        if rank == 0:
            ckpt.retain(root, 1, None)
        rows.append({"bytes": stats.bytes, "sync_s": sync_s, "async_blocked_s": blocked,
                     "async_snapshot_s": snapshot, "async_staging_wait_s": staging_wait,
                     "async_write_s": done.write_seconds, "async_total_s": done.seconds})  # fmt: skip
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:  # the loop waits for the slowest rank: the max over ranks of each round
        merged = [{k: max(g[i][k] for g in gathered) for k in rows[i]} for i in range(len(rows))]
        out.write_text(json.dumps(merged))
    dist.barrier()


def part_saves(args: argparse.Namespace, work: Path) -> dict:
    import yaml

    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data("saves", work, work / "none", args)))
    out = work / "saves.json"
    with socket.socket() as s:  # a free port: a fixed one collides with a concurrent run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
           "--worker", str(spec_path), str(out), str(args.rounds)]  # fmt: skip
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode:
        sys.exit(f"the save benchmark failed:\n{(r.stdout + r.stderr)[-4000:]}")
    rows = json.loads(out.read_text())
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"rounds": rows, "median": med,
            "blocked_ratio": med["async_blocked_s"] / med["sync_s"]}  # fmt: skip


def spec_data(name: str, storage: Path, shards: Path, args: argparse.Namespace, **ck) -> dict:
    return {
        "kind": "train", "name": name, "cluster": {"storage": str(storage)},
        "model": {"preset": args.preset, "parallel": {"precision": args.precision}},
        "data": {"shards": str(shards)},
        "optim": {"global_batch_size": 2 * args.nproc, "micro_batch_size": 2,
                  "warmup_steps": 2},
        "checkpoint": {"every_steps": args.every, "keep_last": 1, **ck},
        "train": {"num_workers": args.nproc, "max_steps": args.steps},
    }  # fmt: skip


def run_loop(data: dict, nproc: int) -> dict:
    """Train ``data`` with the standalone launcher; the loop's figures from metrics.jsonl."""
    from crucible.jobs.runs import prepare_run
    from crucible.jobs.spec import parse_spec

    run_dir = prepare_run(parse_spec(data)).local_path
    cmd = [sys.executable, "-m", "crucible.jobs.train.standalone", str(run_dir),
           "--nproc", str(nproc)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"the run failed:\n{(r.stdout + r.stderr)[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    saves = [r for r in records if r["kind"] == "checkpoint"]
    start = steps[0]["time"] - steps[0]["step_seconds"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        # the last step's save is the last checkpoint: the loop ends once it is committed
        "run_s": steps[-1]["time"] + saves[-1]["blocked_seconds"] - start,
        "steps_s": sum(r["step_seconds"] for r in steps),
        "saves": len(saves),
        "blocked_s": [r["blocked_seconds"] for r in saves],
        "write_s": [r["write_seconds"] for r in saves],
        "bytes": saves[-1]["bytes"] if saves else 0,
    }


def part_run(args: argparse.Namespace, work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import make_shards

    shards = make_shards(work / "data", args.seq_len)
    out = {}
    for mode in ("sync", "async"):
        data = spec_data(mode, work / "runs", shards, args, async_save=mode == "async")
        out[mode] = run_loop(data, args.nproc)
    out["blocked_ratio"] = statistics.median(out["async"]["blocked_s"][:-1] or [0]) / max(
        statistics.median(out["sync"]["blocked_s"][:-1] or [1e-9]), 1e-9
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt1")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--part", choices=("saves", "run", "both"), default="both")
    ap.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        help="model.parallel.precision (default: bf16 on GPUs; fp32 on CPUs, whose bf16 "
        "matmuls are slow; a checkpoint holds 12 bytes per parameter either way)",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precision is None:
        import torch

        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.worker:
        save_worker(Path(args.worker[0]), Path(args.worker[1]), int(args.worker[2]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-async-ckpt-"))
    result: dict = {"preset": args.preset, "nproc": args.nproc, "precision": args.precision}
    try:
        if args.part in ("saves", "both"):
            result["saves"] = part_saves(args, work)
            m = result["saves"]["median"]
            print(f"{args.preset}: {m['bytes'] / 1e9:.2f} GB per checkpoint; median of "
                  f"{args.rounds} rounds: sync save {m['sync_s']:.2f} s blocked; async "
                  f"{m['async_blocked_s']:.3f} s blocked ({result['saves']['blocked_ratio']:.1%}"
                  f": snapshot {m['async_snapshot_s']:.3f} s, wait for the copy before the "
                  f"update {m['async_staging_wait_s']:.3f} s), then {m['async_write_s']:.2f} s "
                  f"written in the background",
                  flush=True)  # fmt: skip
        if args.part in ("run", "both"):
            result["run"] = part_run(args, work)
            for mode in ("sync", "async"):
                r = result["run"][mode]
                print(f"{mode}: {args.steps} steps, a save every {args.every}: run "
                      f"{r['run_s']:.1f} s (steps {r['steps_s']:.1f} s); blocked per save "
                      f"{', '.join(f'{b:.2f}' for b in r['blocked_s'])} s; written in "
                      f"{', '.join(f'{w:.2f}' for w in r['write_s'])} s", flush=True)  # fmt: skip
            print(f"blocked, async/sync (median of the saves before the last): "
                  f"{result['run']['blocked_ratio']:.1%}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
