"""Rank 0's account of the run for people and tools: lines in the job log and one JSON record
per event in ``<run>/metrics.jsonl`` (steps, resumes, checkpoints)."""

from __future__ import annotations

import time
from typing import Any

from crucible.cluster.storage import JsonlLog, Location
from crucible.jobs.train.callbacks.base import Callback, Resumed, StepResult, TrainContext
from crucible.jobs.train.checkpoint import SaveStats
from crucible.jobs.train.console import say

METRICS = "metrics.jsonl"


def open_metrics(run_dir: Location) -> JsonlLog:
    """The run's ``metrics.jsonl`` log (rank 0 writes it; one JSON record per event).

    Args:
        run_dir: the run directory.
    """
    return JsonlLog(run_dir / METRICS, sync_every_s=1.0)


def step_line(record: dict[str, Any], total_steps: int) -> str:
    """The job log's line for one step.

    Args:
        record: the step's record (see :meth:`.StepResult.record`).
        total_steps: planned steps of the run.
    """
    held = f" heldout {record['heldout_loss']:.4f}" if "heldout_loss" in record else ""
    if "heldout_accuracy" in record:
        held += f" accuracy {record['heldout_accuracy']:.3f}"
    if "heldout_exact_match" in record:
        held += f" exact match {record['heldout_exact_match']:.3f}"
    mfu = f" MFU {record['mfu']:.2%}" if record.get("mfu") is not None else ""
    return (
        f"step {record['step']}/{total_steps} loss {record['loss']:.4f}{held} "
        f"lr {record['lr']:.3e} grad_norm {record['grad_norm']:.3f} "
        f"tokens {record['tokens']:,} step {record['step_seconds']:.3f}s "
        f"{record['tokens_per_s']:,.0f} tok/s{mfu}"
    )


class RunLogCallback(Callback):
    """Writes the job log's lines and ``metrics.jsonl`` (rank 0; nothing elsewhere).

    Args:
        ctx: the rank's training context.
    """

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.log = open_metrics(ctx.run_dir) if ctx.rank == 0 else None

    def on_resume(self, resumed: Resumed) -> None:
        if self.log is None:
            return
        r = resumed
        say(
            f"resumed from {r.path.name} (world size {r.world_size} → {self.ctx.world}) in "
            f"{r.seconds:.2f} s ({r.bytes / r.seconds / 1e6:.1f} MB/s)"
        )
        self.log.append(
            {"kind": "resume", "step": r.step, "from": r.path.uri, "world_size": self.ctx.world,
             "from_world_size": r.world_size, "load_seconds": r.seconds, "bytes": r.bytes},
            sync=True,
        )  # fmt: skip

    def on_start(self) -> None:
        if self.log is None:
            return
        plan = self.ctx.plan
        say(
            f"training {self.ctx.spec.name}: steps {self.ctx.step}→{plan.total_steps}, "
            f"{self.ctx.world} workers, micro-batch {plan.micro_batch_size} × "
            f"{plan.grad_accum_steps} accumulation"
        )

    def on_step_end(self, result: StepResult) -> None:
        if self.log is None:
            return
        record = result.record()
        if self.ctx.use_gpu:  # rank 0's peak since the process began: what the planner predicts
            import torch

            record["device_memory_peak_bytes"] = torch.cuda.max_memory_allocated()
        self.log.append({"kind": "step", **record, "time": time.time()})
        total = self.ctx.plan.total_steps
        if result.step % self.ctx.spec.train.log_every == 0 or result.step == total:
            say(step_line(record, total))

    def on_save(self, stats: SaveStats, t0: float) -> None:
        if self.log is None:
            return
        removed = ", ".join(f"step-{s}" for s in stats.removed)
        say(
            f"checkpoint {stats.path.name}: {stats.bytes / 1e6:.2f} MB written in "
            f"{stats.write_seconds:.2f} s ({stats.bytes_per_s / 1e6:.1f} MB/s), training "
            f"blocked {stats.blocked_seconds:.2f} s" + (f"; removed {removed}" if removed else "")
        )
        self.log.append(
            {"kind": "checkpoint", "step": stats.step, "bytes": stats.bytes,
             "save_seconds": stats.blocked_seconds, "blocked_seconds": stats.blocked_seconds,
             "write_seconds": stats.write_seconds, "path": stats.path.uri},
            sync=True,
        )  # fmt: skip

    def on_end(self, status: str) -> None:
        if self.log is not None:
            self.log.close()
