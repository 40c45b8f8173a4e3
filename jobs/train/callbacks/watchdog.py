"""The hang watchdog: no progress (step, evaluation or checkpoint) for ``train.hang_timeout_s``
and every thread's stack is dumped to ``workers/rank-<r>.stacks.log``, then the attempt fails
so that Ray Train restarts it from the last checkpoint (see :mod:`crucible.monitoring.watchdog`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from crucible.cluster.storage import cache_key, scratch_dir
from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.checkpoint import SaveStats
from crucible.monitoring.safe import never_raise
from crucible.monitoring.watchdog import Watchdog


class WatchdogCallback(Callback):
    """Starts with the first step; every event counts as progress.

    Args:
        ctx: the rank's training context.
        on_hang: what a hang does after the stacks are dumped (default: exit the process,
            which fails the attempt).
        record_hang: called first with the unix time of the last progress (the ledger's
            hang record).
    """

    def __init__(
        self,
        ctx: TrainContext,
        on_hang: Callable[[], None] | None = None,
        record_hang: Callable[[float], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.watchdog: Watchdog | None = None
        self._on_hang = on_hang or (lambda: os._exit(1))
        self._record_hang = record_hang
        self._last_progress = time.time()

    @never_raise
    def on_start(self) -> None:
        timeout_s = self.ctx.spec.train.hang_timeout_s
        if timeout_s <= 0:
            return
        run_dir, rank = self.ctx.run_dir, self.ctx.rank
        # dumped locally first (a hang may be the storage's), then copied to the run
        local = scratch_dir("stacks", cache_key(run_dir.uri)) / f"rank-{rank}.log"
        remote = run_dir / "workers" / f"rank-{rank}.stacks.log"

        def on_hang() -> None:
            with contextlib.suppress(Exception):
                remote.upload(local)
            if self._record_hang is not None:
                with contextlib.suppress(Exception):
                    self._record_hang(self._last_progress)
            self._on_hang()

        self._last_progress = time.time()
        self.watchdog = Watchdog(timeout_s, local, on_hang=on_hang).start()

    def _progress(self) -> None:
        if self.watchdog is not None:
            self._last_progress = time.time()
            self.watchdog.progress()

    @never_raise
    def on_step_end(self, result: StepResult) -> None:
        self._progress()

    @never_raise
    def on_eval(
        self, loss: float, t0: float, t1: float, scores: dict[str, float] | None = None
    ) -> None:
        self._progress()

    @never_raise
    def on_save(self, stats: SaveStats, t0: float) -> None:
        self._progress()

    @never_raise
    def on_end(self, status: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
