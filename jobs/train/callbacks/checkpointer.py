"""Checkpoints every ``checkpoint.every_steps`` steps, at the last step and at a graceful stop's
step (unless the stop asks for none): every rank's
shards and RNG state plus crucible's state, committed atomically (see
:mod:`crucible.jobs.train.checkpoint`); then retention, and one ``ray.train.report``."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.callbacks.ledger import LedgerCallback


class CheckpointerCallback(Callback):
    """Saves on the steps the spec asks for; the other callbacks hear of it through ``on_save``.

    Args:
        ctx: the rank's training context.
        ledger: whose totals go into each checkpoint's state.
    """

    def __init__(self, ctx: TrainContext, ledger: LedgerCallback) -> None:
        self.ctx = ctx
        self.ledger = ledger

    def state(self) -> dict[str, Any]:
        """crucible's part of the checkpoint (``crucible_state/state.json``)."""
        ctx = self.ctx
        return {
            "step": ctx.step,
            "samples_consumed": ctx.reader.samples_consumed,
            "reader": ctx.reader.state_dict(),
            "world_size": ctx.world,
            "total_steps": ctx.plan.total_steps,
            "ledger": self.ledger.checkpoint_state(),
            "spec": ctx.spec.model_dump(mode="json"),
        }

    def on_step_end(self, result: StepResult) -> None:
        ctx, c = self.ctx, self.ctx.spec.checkpoint
        last = result.step == ctx.plan.total_steps or (ctx.stop_requested and ctx.stop_checkpoint)
        if result.step % c.every_steps and not last:
            return
        t0 = time.time()
        stats = ckpt.save(ctx.engine, ctx.checkpoints, result.step, self.state(), ctx.rank,
                          ctx.world)  # fmt: skip
        if ctx.rank == 0:
            removed = ckpt.retain(ctx.checkpoints, c.keep_last, c.keep_every)
            stats = dataclasses.replace(stats, removed=tuple(removed))
        # Ray Train's report is a barrier that waits for the controller's next poll (every
        # 2 s): once per checkpoint, not per step. It comes before on_save, so that the
        # ledger's checkpoint interval holds it.
        if ctx.launcher is not None:
            ctx.launcher.report(result.record() | {"checkpoint": stats.path.uri})
        ctx.callbacks.on_save(stats, t0)
