"""The training loop's cross-cutting concerns, one callback each: the GPU-hours ledger,
Prometheus metrics, the hang watchdog, held-out evaluation, the job log and ``metrics.jsonl``,
loss-spike rollback, the loggers chosen in ``monitoring.loggers`` (TensorBoard, W&B), stopping
on request or on SIGTERM (preemption) and checkpointing."""

from __future__ import annotations

import math

from crucible.jobs.train.callbacks.base import (
    Callback,
    Callbacks,
    Resumed,
    StepResult,
    TrainContext,
)
from crucible.jobs.train.callbacks.checkpointer import CheckpointerCallback
from crucible.jobs.train.callbacks.evaluator import EvaluatorCallback
from crucible.jobs.train.callbacks.ledger import LedgerCallback
from crucible.jobs.train.callbacks.prometheus import PrometheusCallback, shared_peak_flops
from crucible.jobs.train.callbacks.rollback import RollbackCallback
from crucible.jobs.train.callbacks.runlog import RunLogCallback
from crucible.jobs.train.callbacks.stopper import StopCallback
from crucible.jobs.train.callbacks.straggler import StragglerCallback
from crucible.jobs.train.callbacks.watchdog import WatchdogCallback
from crucible.monitoring.safe import never_raise

__all__ = [
    "Callback",
    "Callbacks",
    "CheckpointerCallback",
    "Resumed",
    "RollbackCallback",
    "StepResult",
    "StopCallback",
    "TrainContext",
    "build_callbacks",
]


@never_raise
def _peak(rank: int) -> tuple[str, float]:
    return shared_peak_flops(rank)


def build_callbacks(ctx: TrainContext, resumed_from: int) -> Callbacks:
    """The callbacks of one attempt, in the order their hooks run.

    Order matters: metrics fill in a step's MFU and the evaluator its held-out loss before
    the loggers write the step; the checkpointer runs last, so the ledger holds the step
    when its totals go into the checkpoint, and ends first (``on_end`` runs in reverse), so
    the others still hear of a save a failure left in flight.

    Args:
        ctx: the rank's training context (every rank calls this: the peak FLOP/s is
            measured on rank 0 and broadcast).
        resumed_from: step of the checkpoint this attempt resumes from (0: fresh start).
    """
    device, peak = _peak(ctx.rank) or ("", math.nan)
    ledger = LedgerCallback(ctx, resumed_from, device)
    prom = PrometheusCallback(ctx, peak or math.nan, restarts=max(ledger.attempt - 1, 0))
    runlog = RunLogCallback(ctx)
    items: list[Callback] = [
        ledger,
        prom,
        StragglerCallback(ctx, prom.metrics),
        WatchdogCallback(ctx, record_hang=ledger.on_hang),
        EvaluatorCallback(ctx),
        runlog,
        RollbackCallback(ctx, ledger, prom.metrics, runlog.log),  # the loop asks it first
    ]
    if "tensorboard" in ctx.spec.monitoring.loggers:
        from crucible.jobs.train.callbacks.tensorboard import TensorBoardCallback

        items.append(TensorBoardCallback(ctx))
    if "wandb" in ctx.spec.monitoring.loggers:
        from crucible.jobs.train.callbacks.wandb import WandbCallback

        items.append(WandbCallback(ctx))
    # before the checkpointer: a stop requested (or a SIGTERM got) during a step is saved at
    # that step
    items.append(StopCallback(ctx, ledger, runlog.log))
    items.append(CheckpointerCallback(ctx, ledger))
    return Callbacks(items)
