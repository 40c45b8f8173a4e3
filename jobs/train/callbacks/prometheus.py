"""Prometheus metrics of a training rank: every rank serves its own on its node's address,
registered with the cluster's target registry (see :mod:`crucible.monitoring.discovery`);
rank 0 alone records the run-wide series. Metrics never break training: every hook is
exception-safe."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from crucible.jobs.train.callbacks.base import Callback, Resumed, StepResult, TrainContext
from crucible.jobs.train.checkpoint import SaveStats
from crucible.monitoring.safe import never_raise

if TYPE_CHECKING:
    from crucible.monitoring.metrics import TrainMetrics

log = logging.getLogger(__name__)


def shared_peak_flops(rank: int) -> tuple[str, float]:
    """The device and its peak FLOP/s, measured by rank 0 alone and broadcast.

    On a CPU the peak is a timed matmul (cached per machine): ranks measuring at once on
    shared cores would each see a fraction of it. The measurement draws random matrices, so
    it runs on a forked RNG: the training streams stay bitwise as they were.

    Args:
        rank: this rank (the process group must be initialised).
    """
    import torch
    import torch.distributed as dist

    from crucible.monitoring.peak import device_peak_flops

    box: list[Any] = [("unknown", math.nan)]
    if rank == 0:
        try:  # every rank must reach the broadcast, whatever the measurement does
            with torch.random.fork_rng(devices=[]):
                box[0] = device_peak_flops()
        except Exception:
            log.exception("metrics: no device peak FLOP/s; MFU is NaN")
    dist.broadcast_object_list(box, src=0)
    device, peak = box[0]
    return str(device), float(peak)


FINAL_SCRAPE_S = 30.0


class PrometheusCallback(Callback):
    """Serves this rank's metrics and records every event in them.

    Args:
        ctx: the rank's training context.
        peak_flops: the device's peak FLOP/s (NaN: unknown, MFU is NaN).
        restarts: worker-group restarts before this attempt (rank 0 records them).
    """

    def __init__(self, ctx: TrainContext, peak_flops: float, restarts: int) -> None:
        self.ctx = ctx
        self.metrics: TrainMetrics | None = None
        self.port: int | None = None
        self._start(peak_flops, restarts)

    @never_raise
    def _start(self, peak_flops: float, restarts: int) -> None:
        from crucible.monitoring.exporter import start_exporter
        from crucible.monitoring.ledger import LedgerCollector
        from crucible.monitoring.metrics import train_metrics_for

        spec, plan, rank = self.ctx.spec, self.ctx.plan, self.ctx.rank
        budget = spec.train.gpu_hour_budget
        self.metrics = train_metrics_for(
            spec.model.resolve(),
            plan.seq_len,
            num_devices=self.ctx.world,
            rank=rank,
            recompute=spec.model.parallel.activation_checkpointing,
            peak_flops_per_device=peak_flops,
            total_steps=plan.total_steps,
            total_tokens=spec.train.max_tokens,
            gpu_budget_seconds=budget * 3600 if budget else None,
        )
        if rank == 0:
            self.metrics.registry.register(LedgerCollector(self.ctx.run_dir))
            if restarts > 0:
                self.metrics.on_restart(restarts=restarts)
        self.port = start_exporter(spec.name, "train", rank, self.metrics.registry)

    @never_raise
    def on_resume(self, resumed: Resumed) -> None:
        if self.metrics is not None:
            self.metrics.on_load(resumed.seconds, resumed.bytes)

    @never_raise
    def on_step_end(self, result: StepResult) -> None:
        if self.metrics is None:
            return
        self.metrics.on_step(
            result.step, result.loss, result.lr, result.grad_norm, result.tokens,
            result.samples, result.seconds, result.data_wait_seconds,
        )  # fmt: skip
        mfu = self.metrics.last_mfu
        if self.ctx.rank == 0 and mfu is not None and math.isfinite(mfu):
            result.mfu = mfu

    @never_raise
    def on_eval(
        self, loss: float, t0: float, t1: float, scores: dict[str, float] | None = None
    ) -> None:
        if self.metrics is not None:
            self.metrics.on_eval(loss, **(scores or {}))

    @never_raise
    def on_save(self, stats: SaveStats, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.on_checkpoint(
                stats.step, stats.blocked_seconds, stats.bytes, stats.write_seconds
            )

    @never_raise
    def on_end(self, status: str) -> None:
        if self.port is not None:
            from crucible.monitoring.exporter import stop_exporter

            # Rank 0's run-wide values (the last step, the last checkpoint) reach Prometheus
            # only if it scrapes once more: wait for that scrape, up to two 15 s intervals,
            # except when a preemption's grace period is running out.
            final = FINAL_SCRAPE_S if self.ctx.rank == 0 and status != "preempted" else 0.0
            stop_exporter(self.port, final_scrape_s=final)
            self.port = None
