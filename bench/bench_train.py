"""Train job overheads.

1. Orchestration: crucible's own time per training step, outside the engine's forward,
   backward and optimizer step: the reader, the LR update, the loss all-reduce and grad norm,
   and the callbacks (metrics, ledger, watchdog, job log, loggers). The loop records each
   step's ``engine_seconds``; rank 0's step records are ``period`` apart (one whole cycle of
   the loop), and the figure is the median of ``(period - engine_seconds) / period`` over
   the steady-state steps (no warm-up, evaluation or checkpoint steps). Goal: <= 1%.
   On a GPU, also steady-state steps/s against a bare DeepSpeed loop (``deepspeed.initialize``
   + forward/backward/step on the same model, config and batches under ``torchrun``, one rank
   per GPU, NCCL), alternating for ``--rounds`` rounds; goal: ratio >= 0.95. On CPUs that
   ratio is not reported: with every core running a rank, it measures the machine's
   scheduling of Ray's own processes more than crucible.
2. Checkpoint save: bytes/s of crucible's atomic, checksummed save of every rank's ZeRO-3
   shards (model, fp32 master weights, Adam moments) against one raw sequential write
   (+ fsync) of the same number of bytes to the same disk, alternating. Goal: ratio >= 0.8.

Run: ``python bench/bench_train.py [--preset tiny] [--steps 30] [--rounds 3]
[--loggers tensorboard wandb] [--ckpt-preset gpt1] [--saves 3] [--stack ray|cluster]
[--device cpu|gpu] [--seq-len 64] [--global-batch 16] [--micro-batch 4]``. The device
defaults to the GPU where torch sees one (the checkpoint comparison runs on the CPU path only).
``--stack ray`` (the default) runs the trainer in this process on a private Ray instance
without dashboard; ``--stack cluster`` runs what a user runs: ``crucible cluster up`` (Ray
head with dashboard, Prometheus scraping it) and the run submitted as a Ray job.
"""

from __future__ import annotations

import argparse
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

WARMUP = 5  # steps left out of the steady-state rate (allocations, first gathers)


def make_shards(root: Path, seq_len: int) -> Path:
    """A small shard set (tokenizer of 320 ids) for the benchmark."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crucible.data_pipeline.executors.local import LocalExecutor
    from crucible.data_pipeline.shards.build import build_shards
    from crucible.data_pipeline.shards.spec import ShardSpec

    docs = root / "documents"
    docs.mkdir(parents=True)
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was"]
    ids = [f"doc{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([40, 200, 900]))) for _ in ids]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate(
        {"seq_len": seq_len, "heldout_fraction": 0.02, "tokenizer": {"train": {"vocab_size": 320}}}
    )
    build_shards(docs, spec, root / "shards", LocalExecutor(), "bench")
    return root / "shards"


def spec_data(
    name: str,
    storage: Path,
    shards: Path,
    preset: str,
    steps: int,
    workers: int = 2,
    batch: tuple[int, int] = (16, 4),
    loggers: tuple[str, ...] = (),
) -> dict:
    return {
        "kind": "train",
        "name": name,
        "cluster": {"storage": str(storage)},
        "model": {"preset": preset},
        "data": {"shards": str(shards)},
        "optim": {"global_batch_size": batch[0], "micro_batch_size": batch[1], "warmup_steps": 5},
        "checkpoint": {"every_steps": steps, "keep_last": 5},  # one save, at the end
        "train": {"num_workers": workers, "max_steps": steps, "log_every": 1},
        "monitoring": {"loggers": list(loggers)},
    }


def own_time(records: list[dict]) -> list[dict[str, float]]:
    """Per steady-state step: its period (from the previous step's record to its own),
    the engine's part and crucible's parts (reader, the loop's own work, callbacks)."""
    saved = {r["step"] for r in records if r["kind"] == "checkpoint"}
    steps = [r for r in records if r["kind"] == "step"]
    out = []
    for prev, cur in itertools.pairwise(steps):
        if (
            cur["step"] != prev["step"] + 1
            or cur["step"] <= WARMUP
            or prev["step"] in saved  # the save ran inside this period
            or "heldout_loss" in cur
        ):
            continue
        period = cur["time"] - prev["time"]
        out.append({
            "period": period,
            "engine": cur["engine_seconds"],
            "reader": cur["data_wait_seconds"],
            "loop": cur["step_seconds"] - cur["engine_seconds"] - cur["data_wait_seconds"],
            "callbacks": period - cur["step_seconds"],
        })  # fmt: skip
    return out


def steady_rate(times: list[float]) -> float:
    """Steps/s between the end of step WARMUP and the end of the last step."""
    t = times[WARMUP - 1 :]
    return (len(t) - 1) / (t[-1] - t[0])


class OtherLoad:
    """Cores' worth of CPU that processes outside this benchmark's process tree used while
    the ``with`` block ran: the system's busy time (steal included) less the tree's. The tree
    is sampled every ``period_s``; what a process spends after its last sample counts as other
    load (at most ``period_s`` per process)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.cores = 0.0
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            self._seen[key] = max(self._seen.get(key, 0.0), t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    def __enter__(self) -> OtherLoad:
        self._sample()
        self._start = dict(self._seen)
        self._t0, self._busy0 = time.monotonic(), self._busy()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        ours = sum(v - self._start.get(k, 0.0) for k, v in self._seen.items())
        self.cores = max(0.0, self._busy() - self._busy0 - ours) / (time.monotonic() - self._t0)


def bare_worker(spec_path: Path, out: Path, gpu: bool) -> None:
    """One rank of the bare DeepSpeed loop (run under torchrun)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    import yaml

    from crucible.cluster.plan import plan_run
    from crucible.data_pipeline.training_reader import TrainingReader
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.engine import param_groups
    from crucible.jobs.train.state import make_deterministic
    from crucible.model.parallelize import build_zero3_model

    make_deterministic(1)
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    batch_size = spec.optim.global_batch_size
    reader = TrainingReader(
        spec.data.shards, batch_size, rank=rank, world_size=world, doc_index=False
    )
    plan = plan_run(spec, world, seq_len=reader.seq_len, use_gpu=gpu)
    model = build_zero3_model(spec.model.resolve(), plan.ds_config, seed=0)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, 0.1), config=plan.ds_config
    )
    times = []
    for _ in range(plan.total_steps):
        batch = {k: v.to(engine.device) for k, v in reader.next_batch().items()}
        for i in range(0, batch["input_ids"].shape[0], plan.micro_batch_size):
            _, loss = engine(
                batch["input_ids"][i : i + plan.micro_batch_size],
                batch["labels"][i : i + plan.micro_batch_size],
            )
            engine.backward(loss)
            engine.step()
        loss.item()
        times.append(time.time())
    if rank == 0:
        out.write_text(json.dumps(times))
    dist.barrier()


def raw_write_rate(directory: Path, nbytes: int) -> float:
    """Bytes/s of one sequential write of ``nbytes`` (8 MiB blocks) + fsync."""
    block = os.urandom(8 << 20)
    path = directory / "raw.bin"
    t0 = time.perf_counter()
    with path.open("wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds


def save_worker(spec_path: Path, out: Path, saves: int) -> None:
    """One rank of the checkpoint benchmark (run under torchrun): one optimizer step (so Adam's
    states exist), then ``saves`` rounds of crucible's save alternating with rank 0's raw
    write of the same number of bytes to the same directory."""
    import deepspeed
    import torch.distributed as dist
    import yaml

    from crucible.cluster.plan import plan_run
    from crucible.cluster.storage import location
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.checkpoint import save
    from crucible.jobs.train.engine import build_engine
    from crucible.jobs.train.state import make_deterministic

    make_deterministic(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    plan = plan_run(spec, world, seq_len=64)
    engine = build_engine(spec, plan)
    ids = torch_ids(spec, plan.micro_batch_size)
    _, loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    root = location(out.parent / "ckpt")
    root.mkdirs()
    rounds = []
    for i in range(1, saves + 1):
        stats = save(engine, root, i, {"step": i}, rank, world)
        raw = raw_write_rate(root.local_path, stats.bytes) if rank == 0 else 0.0
        dist.barrier()
        if rank == 0:
            ckpt.retain(root, 1, None)
            rounds.append({"bytes": stats.bytes, "save": stats.bytes_per_s, "raw": raw})
    if rank == 0:
        out.write_text(json.dumps(rounds))
    dist.barrier()


def torch_ids(spec, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, spec.model.resolve().vocab_size, (batch, 65), generator=g)


def torchrun(*args: str, nproc: int = 2, gpu: bool = False) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    with socket.socket() as s:  # a free port: a fixed one collides with a concurrent run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, *args]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        log = Path(tempfile.mkstemp(prefix="bench-train-torchrun-", suffix=".log")[1])
        log.write_text(r.stdout + r.stderr)
        sys.exit(f"torchrun {' '.join(args)} failed (exit {r.returncode}); its output: {log}")


def run_on_local_cluster(data: dict) -> Path:
    """What a user runs: a local cluster (Ray head, dashboard, Prometheus) on free ports, the
    run submitted to it as a Ray job and followed to the end, the cluster stopped; return the
    run directory."""
    from crucible.cluster import local
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.submit import submit_run

    home = Path(tempfile.mkdtemp(prefix="bt", dir="/tmp"))
    os.environ["CRUCIBLE_HOME"] = str(home)
    local.up(home / "cluster", local.free_ports(), num_cpus=2)
    try:
        client, job_id, run_dir = submit_run(parse_spec(data))
        log = "".join(client.follow(job_id))
        if not str(client.status(job_id)).endswith("SUCCEEDED"):
            sys.exit(f"the benchmark's train job failed; its log ends:\n{log[-3000:]}")
    finally:
        local.down(home / "cluster")
        shutil.rmtree(home, ignore_errors=True)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", help="model of the orchestration comparison")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--rounds", type=int, default=3, help="crucible runs (on GPUs: bare/crucible pairs)"
    )
    ap.add_argument("--loggers", nargs="*", default=[], choices=["tensorboard", "wandb"],
                    help="monitoring.loggers of crucible's runs")  # fmt: skip
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training workers (default: 2 on CPU, one per GPU; on a 2-core machine 1 leaves a "
        "core to Ray's daemons)",
    )
    ap.add_argument(
        "--stack",
        choices=["ray", "cluster"],
        default="ray",
        help="crucible's side: the trainer on in-process Ray, or a job on `crucible cluster up`",
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default=None,
        help="workers' device (default: gpu where torch sees one, one worker per GPU)",
    )
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sample of the shards")
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    ap.add_argument("--ckpt-preset", default="gpt1", help="model of the checkpoint comparison")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument(
        "--bare-worker", nargs=3, metavar=("SPEC", "OUT", "DEVICE"), help=argparse.SUPPRESS
    )
    ap.add_argument("--save-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_worker:
        bare_worker(Path(a.bare_worker[0]), Path(a.bare_worker[1]), a.bare_worker[2] == "gpu")
        return
    if a.save_worker:
        save_worker(Path(a.save_worker[0]), Path(a.save_worker[1]), a.saves)
        return
    import torch

    gpu = (a.device or ("gpu" if torch.cuda.is_available() else "cpu")) == "gpu"
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    workers = a.workers or (torch.cuda.device_count() if gpu else 2)
    import ray
    import yaml

    from crucible.cluster.storage import read_jsonl
    from crucible.jobs.runs import prepare_run
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.run import run_train
    from crucible.model.presets import get_preset

    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir="/tmp"))
    seq_len = min(a.seq_len, get_preset(a.preset).max_seq_len)
    shards = make_shards(work / "data", seq_len)

    # Orchestration: crucible (Ray up only for its run); on a GPU alternating with the bare
    # loop (no Ray running), so drift in the machine's speed hits both sides alike.
    ratios, bares, ours, rows = [], [], [], []
    for r in range(a.rounds):
        data = spec_data(f"bench-{r}", work / "runs", shards, a.preset, a.steps, workers,
                         (a.global_batch, a.micro_batch), tuple(a.loggers))  # fmt: skip
        (work / "spec.yaml").write_text(yaml.safe_dump(data))
        if gpu:
            torchrun("--bare-worker", str(work / "spec.yaml"), str(work / "bare.json"), "gpu",
                     nproc=workers, gpu=True)  # fmt: skip
            bares.append(steady_rate(json.loads((work / "bare.json").read_text())))
        with OtherLoad() as our_load:
            if a.stack == "cluster":
                run_dir = run_on_local_cluster(data)
            else:
                run_dir = prepare_run(parse_spec(data))
                # CPU: the 2 cores the workers use; GPU: Ray counts the node's CPUs and GPUs
                ray.init(address="local", num_cpus=None if gpu else 2, include_dashboard=False,
                         log_to_driver=False)  # fmt: skip
                try:
                    run_train(run_dir)
                finally:
                    ray.shutdown()
        recs = read_jsonl(run_dir / "metrics.jsonl")
        got = own_time(recs)
        rows += got
        share = median((x["period"] - x["engine"]) / x["period"] for x in got)
        line = (f"round {r + 1}: crucible's own time {share:.2%} of a step "
                f"(median of {len(got)} steps)")  # fmt: skip
        if gpu:
            ours.append(steady_rate([r["time"] for r in recs if r["kind"] == "step"]))
            ratios.append(ours[-1] / bares[-1])
            line += f"; steps/s crucible {ours[-1]:.3f}, bare {bares[-1]:.3f}"
        print(f"{line}; other processes' CPU meanwhile {our_load.cores:.2f} cores", flush=True)

    if rows:
        device = f"{torch.cuda.get_device_name()} GPU" if gpu else "CPU"
        print(f"\norchestration ({a.stack} stack): model {a.preset}, {workers} {device} workers, "
              f"global batch {a.global_batch} × {seq_len} tokens, {a.steps} steps ({WARMUP} "
              f"warm-up, evaluation and checkpoint steps left out), {a.rounds} rounds, "
              f"loggers: {', '.join(a.loggers) or 'none'}")  # fmt: skip
        med = {k: median(x[k] for x in rows) for k in rows[0]}
        share = median((x["period"] - x["engine"]) / x["period"] for x in rows)
        print(
            f"crucible's own time per step: {share:.2%} of a step (goal <= 1%); median step "
            f"{med['period'] * 1e3:.1f} ms: engine {med['engine'] * 1e3:.1f} ms, reader "
            f"{med['reader'] * 1e3:.2f} ms, loop (LR, loss all-reduce, grad norm) "
            f"{med['loop'] * 1e3:.2f} ms, callbacks {med['callbacks'] * 1e3:.2f} ms"
        )
        if gpu:
            print(
                f"steps/s  crucible train (Ray Train) {median(ours):.3f}   bare DeepSpeed "
                f"(torchrun) {median(bares):.3f}   ratio median {median(ratios):.3f} "
                f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})  (goal >= 0.95)"
            )
        else:
            print("end-to-end ratio against bare DeepSpeed: measured on GPUs only")
    if a.saves and gpu:
        print("ckpt save: measured on the CPU path only (run with --device cpu)")
    elif a.saves:
        # Checkpoint save against a raw write of the same bytes, alternating, on a model whose
        # checkpoint is large enough (gpt1: 1.4 GB) that fixed costs do not decide the figure.
        ck = spec_data("bench-ckpt", work / "runs", shards, a.ckpt_preset, 1)
        ck["optim"] |= {"global_batch_size": 2, "micro_batch_size": 1}
        (work / "ckpt.yaml").write_text(yaml.safe_dump(ck))
        torchrun("--save-worker", str(work / "ckpt.yaml"), str(work / "saves.json"),
                 "--saves", str(a.saves))  # fmt: skip
        saves = json.loads((work / "saves.json").read_text())
        save_ratios = [s["save"] / s["raw"] for s in saves]

        print(
            f"ckpt save ({a.ckpt_preset}, {saves[0]['bytes'] / 1e9:.2f} GB, 2 ranks) "
            f"{median([s['save'] for s in saves]) / 1e6:.0f} MB/s   raw sequential write+fsync "
            f"{median([s['raw'] for s in saves]) / 1e6:.0f} MB/s   ratio median "
            f"{median(save_ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in save_ratios)})  "
            "(goal >= 0.8)"
        )


if __name__ == "__main__":
    main()
