"""Train job overheads, each side by side with its baseline in the same run.

1. Orchestration: steady-state steps/s of ``crucible train`` (Ray Train workers, reader,
   per-step reports and metrics) against a bare DeepSpeed loop (``deepspeed.initialize`` +
   forward/backward/step on the same model, config and batches, ``torchrun
   --nproc_per_node 2``, ``DS_ACCELERATOR=cpu``). Goal: ratio >= 0.95.
2. Checkpoint save: bytes/s of crucible's atomic, checksummed save of every rank's ZeRO-3
   shards against one raw sequential write (+ fsync) of the same number of bytes to the same
   disk. Goal: ratio >= 0.8.

Run: ``python bench/bench_train.py [--preset debug] [--steps 30]`` (starts a private
in-process Ray instance with 2 CPUs; uses 2 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 5  # steps left out of the steady-state rate (allocations, first gathers)


def make_shards(root: Path, seq_len: int) -> Path:
    """A small shard set (tokenizer of 320 ids) for the benchmark."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    build_shards(docs, spec, root / "shards", "local", "bench")
    return root / "shards"


def spec_data(name: str, storage: Path, shards: Path, preset: str, steps: int) -> dict:
    return {
        "kind": "train",
        "name": name,
        "cluster": {"storage": str(storage)},
        "model": {"preset": preset},
        "data": {"shards": str(shards)},
        "optim": {"global_batch_size": 16, "micro_batch_size": 4, "warmup_steps": 5},
        "checkpoint": {"every_steps": steps, "keep_last": 5},  # one save, at the end
        "train": {"num_workers": 2, "max_steps": steps, "log_every": 1},
    }


def steady_rate(times: list[float]) -> float:
    """Steps/s between the end of step WARMUP and the end of the last step."""
    t = times[WARMUP - 1 :]
    return (len(t) - 1) / (t[-1] - t[0])


def bare_worker(spec_path: Path, out: Path) -> None:
    """One rank of the bare DeepSpeed loop (run under torchrun)."""
    import deepspeed
    import torch.distributed as dist
    import yaml

    from crucible.data_pipeline.reader import TrainingReader
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.loop import param_groups
    from crucible.jobs.train.plan import make_plan
    from crucible.jobs.train.state import make_deterministic
    from crucible.model.parallelize import build_zero3_model

    make_deterministic(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    reader = TrainingReader(spec.data.shards, 16, rank=rank, world_size=world, doc_index=False)
    plan = make_plan(spec, world, seq_len=reader.seq_len)
    model = build_zero3_model(spec.model.resolve(), plan.ds_config, seed=0)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, 0.1), config=plan.ds_config
    )
    times = []
    for _ in range(plan.total_steps):
        batch = reader.next_batch()
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bare-worker", nargs=2, metavar=("SPEC", "OUT"))
    a = ap.parse_args()
    if a.bare_worker:
        bare_worker(Path(a.bare_worker[0]), Path(a.bare_worker[1]))
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    import ray
    import yaml

    from crucible.jobs.runs import prepare_run
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.run import run_train

    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir="/tmp"))
    from crucible.model.presets import get_preset

    seq_len = min(64, get_preset(a.preset).max_seq_len)
    shards = make_shards(work / "data", seq_len)
    data = spec_data("bench", work / "runs", shards, a.preset, a.steps)
    spec = parse_spec(data)

    # Bare DeepSpeed loop first (no Ray running), then crucible through Ray Train.
    (work / "spec.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", __file__, "--bare-worker", str(work / "spec.yaml"),
           str(work / "bare.json")]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    bare = steady_rate(json.loads((work / "bare.json").read_text()))

    run_dir = prepare_run(spec)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_train(run_dir)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ours = steady_rate([r["time"] for r in recs if r["kind"] == "step"])
    saves = [r for r in recs if r["kind"] == "checkpoint"]
    save_rate = sum(r["bytes"] for r in saves) / sum(r["save_seconds"] for r in saves)
    raw = raw_write_rate(run_dir / "checkpoints", saves[-1]["bytes"])
    ray.shutdown()

    print(f"model {a.preset}, 2 CPU workers, global batch 16 × {seq_len} tokens, "
          f"{a.steps} steps ({WARMUP} warm-up left out)")  # fmt: skip
    print(
        f"steps/s  crucible train (Ray Train) {ours:.3f}   bare DeepSpeed (torchrun) "
        f"{bare:.3f}   ratio {ours / bare:.3f}  (goal >= 0.95)"
    )
    print(
        f"ckpt save {save_rate / 1e6:.1f} MB/s ({saves[-1]['bytes'] / 1e6:.1f} MB, "
        f"{len(saves)} saves)   raw sequential write+fsync {raw / 1e6:.1f} MB/s   "
        f"ratio {save_rate / raw:.3f}  (goal >= 0.8)"
    )


if __name__ == "__main__":
    main()
