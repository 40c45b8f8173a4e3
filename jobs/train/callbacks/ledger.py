"""The GPU-hours ledger: rank 0 records where every device-second of the attempt went (see
:mod:`crucible.monitoring.ledger`); its running totals go into each checkpoint."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from crucible.jobs.train.callbacks.base import Callback, Resumed, StepResult, TrainContext
from crucible.jobs.train.checkpoint import SaveStats
from crucible.monitoring.safe import never_raise

if TYPE_CHECKING:
    from crucible.monitoring.ledger import LedgerWriter


class LedgerCallback(Callback):
    """Rank 0 writes the attempt's ledger for all its devices; other ranks do nothing.

    Args:
        ctx: the rank's training context.
        resumed_from: step of the checkpoint this attempt resumes from (0: fresh start).
        device: the device, for the attempt's record.
    """

    def __init__(self, ctx: TrainContext, resumed_from: int, device: str) -> None:
        self.ctx = ctx
        self.writer: LedgerWriter | None = None
        self._emergency_step: int | None = None
        self._open(resumed_from, device)

    @property
    def attempt(self) -> int:
        """This attempt's number (1 for the first; -1 where there is no ledger)."""
        return self.writer.attempt if self.writer is not None else -1

    @never_raise
    def _open(self, resumed_from: int, device: str) -> None:
        if self.ctx.rank != 0:
            return
        from crucible.monitoring.ledger import LedgerWriter

        self.writer = LedgerWriter(
            self.ctx.run_dir, self.ctx.world, resumed_from=resumed_from, device=device
        )

    @never_raise
    def on_resume(self, resumed: Resumed) -> None:
        if self.writer is not None:  # called as the restore ends
            now = time.time()
            self.writer.interval("checkpoint_load", now - resumed.seconds, now)

    @never_raise
    def on_start(self) -> None:
        if self.writer is not None:
            self.writer.startup_done()

    @never_raise
    def on_hang(self, since: float) -> None:
        """The watchdog fired: from ``since`` (unix time of the last progress) to now the
        devices were hung; recorded before the process exits."""
        if self.writer is not None:
            self.writer.interval("hang", since, time.time())

    @never_raise
    def on_rollback(self, t0: float, t1: float, to_step: int, from_step: int) -> None:
        """A bad step began at ``t0`` and the reload after it ended at ``t1``: the run went
        back from step ``from_step`` to ``to_step`` (the steps in between are wasted too)."""
        if self.writer is not None:
            self.writer.interval("rollback", t0, t1, step=to_step, from_step=from_step)

    def on_preempted(self, step: int) -> None:
        """Every rank stops after ``step`` for a SIGTERM: its save, unless one was due then
        anyway, is time lost to the preemption."""
        self._emergency_step = step if step % self.ctx.spec.checkpoint.every_steps else None

    @never_raise
    def on_step_end(self, result: StepResult) -> None:
        if self.writer is not None:
            self.writer.step(
                result.step, result.started, result.started + result.seconds,
                result.data_wait_seconds, result.checkpoint_wait_seconds,
            )  # fmt: skip

    @never_raise
    def on_eval(
        self, loss: float, t0: float, t1: float, scores: dict[str, float] | None = None
    ) -> None:
        if self.writer is not None:
            self.writer.interval("eval", t0, t1)

    @never_raise
    def on_save(self, stats: SaveStats, t0: float) -> None:
        """Bills the time the loop waited for the save (a synchronous one's write,
        retention and Ray Train's report; an asynchronous one's snapshot), and only that: an
        asynchronous save's writing overlaps steps, billed as steps (the part of a step that
        waited for its copy to host memory is billed with the step's record)."""
        if self.writer is None:
            return
        for start, end in stats.blocked_spans or ((t0, t0 + stats.blocked_seconds),):
            self.writer.checkpoint(stats.step, start, end, committed=True,
                                   preemption=stats.step == self._emergency_step)  # fmt: skip

    @never_raise
    def on_end(self, status: str) -> None:
        if self.writer is not None:
            self.writer.end(status)

    def checkpoint_state(self) -> dict[str, Any]:
        """The ledger so far, for a checkpoint's state: device-seconds by phase as
        :func:`~crucible.monitoring.ledger.account` reads them (zeros off rank 0)."""
        return self._totals() or {"worker_seconds": 0.0}

    @never_raise
    def _totals(self) -> dict[str, Any]:
        if self.ctx.rank != 0:
            return {}
        from crucible.monitoring.ledger import account

        s = account(self.ctx.run_dir, stale_after_s=math.inf)
        return {
            "worker_seconds": s.total_seconds,
            "gpu_seconds": s.total_seconds if self.ctx.use_gpu else 0.0,
            "seconds": s.seconds,
            "attempts": s.attempts,
        }
