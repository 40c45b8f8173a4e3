"""Resume time with checkpoint verification on and off, on a local disk and on S3.

Two ranks (``torchrun``, gloo, ``DS_ACCELERATOR=cpu``) build the model (``gpt1`` by default,
a 1.4 GB ZeRO-3 checkpoint with Adam states), take one step and save a checkpoint with
crucible's save to a local directory and to a real S3 server (moto). Then, for each storage
and each ``checkpoint.verify`` mode, they resume as a train job's ranks do
(``checkpoint.choose_checkpoint``: each rank checks, and from S3 fetches into node-local scratch,
only the files it owns, then ``engine.load_checkpoint``), with the node's cache emptied
before each round. For comparison, the driver-side check this replaced: one process hashing
every file of the checkpoint before any worker starts.

    python bench/bench_resume.py [--preset gpt1] [--rounds 2]

The local checkpoint was just written, so its reads come from the page cache: the local
figures are the hashing and loading cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(spec_path: Path, out: Path, s3_root: str, rounds: int) -> None:
    """One rank: save to both storages, then resume from each in both modes."""
    import deepspeed
    import torch
    import torch.distributed as dist
    import yaml

    from crucible.cluster.plan import plan_run
    from crucible.cluster.storage import location, scratch_dir
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.checkpoint import choose_checkpoint, save
    from crucible.jobs.train.engine import build_engine
    from crucible.jobs.train.state import make_deterministic

    make_deterministic(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    plan = plan_run(spec, world, seq_len=64)
    engine = build_engine(spec, plan)
    vocab = spec.model.resolve().vocab_size
    ids = torch.randint(0, vocab, (plan.micro_batch_size, 65), generator=torch.Generator())
    _, loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    results: dict[str, dict] = {}
    for name, root in (("local", location(out.parent / "ckpt")), ("s3", location(s3_root))):
        stats = save(engine, root, 1, {"step": 1}, rank, world)
        path = ckpt.step_path(root, 1)
        r: dict[str, list[float]] = {"driver_sha256": []}
        if rank == 0:  # what the driver did before: every byte hashed by one process
            for _ in range(rounds):
                t0 = time.perf_counter()
                assert ckpt.verify(path, "sha256") is None
                r["driver_sha256"].append(time.perf_counter() - t0)
        for mode in ("size", "sha256"):
            r[f"check_{mode}"], r[f"load_{mode}"] = [], []
            for _ in range(rounds):
                if rank == 0:  # one node here: its cache of fetched files, emptied
                    shutil.rmtree(scratch_dir("checkpoints-load"), ignore_errors=True)
                dist.barrier()
                t0 = time.perf_counter()
                chosen = choose_checkpoint(root, mode, rank, world)
                dist.barrier()
                t1 = time.perf_counter()
                assert chosen is not None
                engine.load_checkpoint(str(chosen[1]), tag=ckpt.DS_TAG,
                                       load_lr_scheduler_states=False)  # fmt: skip
                dist.barrier()
                r[f"check_{mode}"].append(t1 - t0)
                r[f"load_{mode}"].append(time.perf_counter() - t1)
        results[name] = {"bytes": stats.bytes, **r}
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.barrier()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=4, metavar=("SPEC", "OUT", "S3", "ROUNDS"),
                    help=argparse.SUPPRESS)  # fmt: skip
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker[0]), Path(a.worker[1]), a.worker[2], int(a.worker[3]))
        return 0
    import drill
    import yaml

    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    spec = {
        "kind": "train", "name": "resume", "model": {"preset": a.preset},
        "data": {"shards": "/unused"}, "optim": {"global_batch_size": 2, "micro_batch_size": 1},
        "train": {"num_workers": 2, "max_steps": 1},
    }  # fmt: skip
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    try:
        with drill.s3_server(log=Path("/tmp/bench-resume-moto.log")) as server:
            env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **server.env)
            env["CRUCIBLE_SCRATCH"] = str(work / "scratch")
            root = server.bucket("resume") + "/checkpoints"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
                   "--worker", str(work / "spec.yaml"), str(work / "out.json"), root,
                   str(a.rounds)]  # fmt: skip
            t0 = time.monotonic()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                print(r.stdout[-3000:] + r.stderr[-5000:])
                return 1
        res = json.loads((work / "out.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.preset}: 2 ranks, medians of {a.rounds} rounds ({time.monotonic() - t0:.0f} s)")
    print(f"{'storage':<8}{'GB':>6}  {'driver sha256 (before)':>24}  {'verify':>7} "
          f"{'rank check/fetch s':>19} {'load s':>8} {'resume s':>9}")  # fmt: skip
    for name, v in res.items():
        drv = median(v["driver_sha256"])
        for mode in ("size", "sha256"):
            chk, load = median(v[f"check_{mode}"]), median(v[f"load_{mode}"])
            print(f"{name:<8}{v['bytes'] / 1e9:6.2f}  {drv:24.2f}  {mode:>7} {chk:19.2f} "
                  f"{load:8.2f} {chk + load:9.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
