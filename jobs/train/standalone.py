"""Train a prepared run on this one node without Ray: ``torchrun`` starts one rank per GPU
(or ``--nproc`` CPU ranks), and each runs the train job's own loop.

    python -m crucible.jobs.train.standalone RUN_DIR [--nproc N]

``RUN_DIR`` is a run directory as the train job has it (``spec.resolved.yaml`` written by
:func:`crucible.jobs.runs.prepare_run`). Everything inside the ranks is the train job's:
checkpoints, resume, metrics, ledger, graceful stop. What Ray Train adds is not here: no
restart after a lost rank (run it again and it resumes from the last checkpoint), no
placement over several nodes, no Ray job. The GPU check runs training this way, because its
machines have no Ray.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError
from crucible.jobs.runs import load_train_spec, stop_request
from crucible.jobs.spec import FinetuneRunSpec


def run_workers(run_dir: Location, nproc: int) -> int:
    """Check the run as the train job's driver does, run ``nproc`` ranks under torchrun and
    print the run's summary; return torchrun's exit code.

    Args:
        run_dir: the prepared run directory.
        nproc: ranks on this node.

    Raises:
        CrucibleError: bad shards, or a NaN loss.
    """
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.run import check_shards, summarize

    spec = load_train_spec(run_dir)
    manifest = check_shards(spec)
    if isinstance(spec, FinetuneRunSpec):
        from crucible.jobs.finetune.base import check_base, prepare_base

        check_base(spec, manifest.tokenizer.fingerprint)
        prepare_base(spec, run_dir, use_ray=False)
    (run_dir / "nan.json").rm()
    root = run_dir / "checkpoints"
    root.mkdirs()
    found = ckpt.latest_committed(root)
    if found is not None and (saved := int(found[1]["world_size"])) != nproc:
        from crucible.jobs.train.reshard import ensure_universal, say_converted

        t0 = time.perf_counter()
        ensure_universal(found[0], (ckpt.DS_TAG,))
        say_converted(found[0], saved, nproc, time.perf_counter() - t0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "crucible.jobs.train.standalone", "--worker", run_dir.uri]  # fmt: skip
    t0 = time.perf_counter()
    code = subprocess.call(cmd, env=os.environ.copy())
    nan = run_dir / "nan.json"
    if nan.is_file():
        info = nan.read_json()
        raise CrucibleError(
            f"loss became {info['loss']} at step {info['step']}; stopped; last good "
            f"checkpoint: {info['last_checkpoint']}"
        )
    if code != 0 and _preempted(run_dir):
        print(f"preempted (SIGTERM) with a checkpoint; run it again to resume {run_dir}",
              flush=True)  # fmt: skip
    if code == 0:
        print(summarize(run_dir, time.perf_counter() - t0), flush=True)
        if stop_request(run_dir).is_file():
            print(f"stopped on request; run it again to continue {run_dir}", flush=True)
    return code


def _preempted(run_dir: Location) -> bool:
    """Whether the run's last record says its attempt was preempted."""
    from crucible.cluster.storage import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    return bool(records) and records[-1].get("kind") == "preempted"


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m crucible.jobs.train.standalone")
    ap.add_argument("run_dir", help="a prepared run directory (path or URI)")
    ap.add_argument("--nproc", type=int, default=0, help="ranks (default: one per GPU, else 1)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    use_gpu = torch.cuda.is_available()
    if args.worker:
        from crucible.jobs.train.loop import train_loop_per_worker

        if use_gpu:
            torch.cuda.set_device(
                int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            )
        from crucible.jobs.train.callbacks.preemption import Preempted

        try:
            train_loop_per_worker({"run_dir": args.run_dir, "use_gpu": use_gpu})
        except Preempted as e:  # saved; no Ray Train here to restart it: the rerun resumes
            print(
                f"rank {os.environ.get('RANK', '?')}: Preempted: {e}", file=sys.stderr, flush=True
            )
            return 143
        return 0
    nproc = args.nproc or (torch.cuda.device_count() if use_gpu else 1)
    try:
        return run_workers(location(args.run_dir), nproc)
    except CrucibleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
