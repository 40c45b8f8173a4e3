"""One rank of the asynchronous-save test (run under torchrun by test_async_checkpoint.py).

Trains the tiny preset one step, saves it synchronously into ``<root>/sync``, snapshots the
same state for an asynchronous save into ``<root>/async`` (a local path or an object store)
and, while that save is in flight with its background work held (the copy to host memory
too), runs the next step's forward and backward; then lets the save go on, waits for its
copy (as the loop does before the optimizer step), steps, tries to start a second save and
waits for the commit. Writes what the test checks to ``<out>/rank<R>.json``.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml

from crucible.cluster.plan import plan_run
from crucible.cluster.storage import location
from crucible.jobs.spec import parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.checkpoint import async_save
from crucible.jobs.train.engine import build_engine
from crucible.jobs.train.state import make_deterministic


def train_step(engine, gen: torch.Generator, vocab: int, before_update=None) -> None:
    for _ in range(engine.gradient_accumulation_steps()):
        ids = torch.randint(0, vocab, (4, 65), generator=gen)
        _, loss = engine(ids[:, :-1], ids[:, 1:])
        engine.backward(loss)
        if before_update is not None and engine.is_gradient_accumulation_boundary():
            before_update()
        engine.step()


def main(spec_path: Path, out: Path, root: str) -> None:
    make_deterministic(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = parse_spec(yaml.safe_load(spec_path.read_text()))
    plan = plan_run(spec, world, seq_len=64)  # type: ignore[arg-type]
    engine = build_engine(spec, plan)  # type: ignore[arg-type]
    vocab = spec.model.resolve().vocab_size  # type: ignore[union-attr]
    gen = torch.Generator().manual_seed(rank)
    train_step(engine, gen, vocab)
    state = {"step": 1, "note": "the same state for both saves"}
    sync_root, async_root = location(root) / "sync", location(root) / "async"
    sync_root.mkdirs()
    async_root.mkdirs()
    ckpt.save(engine, sync_root, 1, state, rank, world)

    go = threading.Event()
    real_write = async_save.write_snapshot

    def held_write(*args, **kwargs):  # the write starts only once the next step is trained
        go.wait()
        return real_write(*args, **kwargs)

    async_save.write_snapshot = held_write
    saver = async_save.AsyncSaver(async_root, rank, world, pinned=False)
    snap = saver.start(engine, 1, state)
    in_flight = saver.in_flight and not (async_root / "step-1").exists()
    unstaged = []

    def before_update() -> None:  # forward and backward ran with the copy not yet taken
        unstaged.append(not snap.stager.done and not any(c.staged for _, c in snap.files))
        go.set()
        saver.wait_staged()

    # The forward and backward must leave the state alone; the step changes every weight
    # and moment the snapshot copies.
    train_step(engine, gen, vocab, before_update)
    try:
        saver.start(engine, 2, state)
        second = "started"
    except RuntimeError as e:
        second = str(e)
    stats = saver.wait()
    reused = saver.buffers.nbytes  # the copies' memory is kept for the next save
    assert stats is not None
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "in_flight": in_flight,
                "unstaged_until_update": unstaged == [True],
                "second": second,
                "snapshot_bytes": snap.nbytes,
                "reused_bytes": reused,
                "blocked": stats.blocked_seconds,
                "write": stats.write_seconds,
                "seconds": stats.seconds,
                "bytes": stats.bytes,
            }
        )
    )
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
