"""Checkpoints every ``checkpoint.every_steps`` steps, at the last step and at a graceful stop's
step (unless the stop asks for none): every rank's shards and RNG state plus crucible's state,
committed atomically (see :mod:`crucible.jobs.train.checkpoint`); then retention, and one
``ray.train.report``.

With ``checkpoint.async_save`` (the default) the loop waits only while the state is copied to
host memory; the writing, the commit, retention and the report run in the background, and the
other callbacks hear of the checkpoint (``on_save``) at the first step end after its commit.
A save waits for the one before it; the run's last step waits for its own save, so nothing
is left in flight when the loop ends (and the attempt's end waits for one a failure left).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.callbacks.ledger import LedgerCallback
from crucible.jobs.train.checkpoint.async_save import AsyncSaver, supports_async
from crucible.jobs.train.console import say


class CheckpointerCallback(Callback):
    """Saves on the steps the spec asks for; the other callbacks hear of it through ``on_save``.

    Args:
        ctx: the rank's training context.
        ledger: whose totals go into each checkpoint's state.
    """

    def __init__(self, ctx: TrainContext, ledger: LedgerCallback) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.saver: AsyncSaver | None = None
        self._t0 = 0.0  # unix time the loop began to wait for the save in flight

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
        self._hand_back(block=False)
        last = result.step == ctx.plan.total_steps
        due = result.step % c.every_steps == 0 or last
        if ctx.stop_requested:
            due = due or ctx.stop_checkpoint
        if due and c.async_save and supports_async(ctx.engine):
            self._save_async(result, ending=last or ctx.stop_requested)
        elif due:
            self._save_sync(result)
        elif ctx.stop_requested:
            self._hand_back(block=True)  # the loop ends: its last save is committed first

    def _save_sync(self, result: StepResult) -> None:
        ctx = self.ctx
        self._hand_back(block=True)  # one left by an asynchronous save (async_save turned off)
        t0, p0 = time.time(), time.perf_counter()
        stats = ckpt.save(ctx.engine, ctx.checkpoints, result.step, self.state(), ctx.rank,
                          ctx.world)  # fmt: skip
        # Ray Train's report is a barrier that waits for the controller's next poll (every
        # 2 s): once per checkpoint, not per step. It comes before on_save, so that the
        # ledger's checkpoint interval holds it.
        stats = self._retain(stats)
        self._report(result.record(), stats)
        ctx.callbacks.on_save(dataclasses.replace(stats, blocked=time.perf_counter() - p0), t0)

    def _save_async(self, result: StepResult, ending: bool) -> None:
        ctx = self.ctx
        t0, p0 = time.time(), time.perf_counter()
        self._hand_back(block=True)  # never two in flight: the previous one is committed first
        if self.saver is None:
            stall = frozenset(ctx.spec.checkpoint.test_stall_steps)
            self.saver = AsyncSaver(ctx.checkpoints, ctx.rank, ctx.world, ctx.use_gpu, stall)
        record = result.record()
        self.saver.start(ctx.engine, result.step, self.state(), on_commit=self._retain,
                         then=lambda stats: self._report(record, stats),
                         waited=time.perf_counter() - p0)  # fmt: skip
        self._t0 = t0
        if ending:  # nothing may be in flight once the loop is over: wait for the commit
            self._hand_back(block=True, blocked_since=p0)

    def _retain(self, stats: ckpt.SaveStats) -> ckpt.SaveStats:
        """Rank 0, once a checkpoint is committed: retention (in the background for an
        asynchronous save)."""
        if self.ctx.rank != 0:
            return stats
        c = self.ctx.spec.checkpoint
        removed = ckpt.retain(self.ctx.checkpoints, c.keep_last, c.keep_every)
        return dataclasses.replace(stats, removed=tuple(removed))

    def _report(self, record: dict[str, Any], stats: ckpt.SaveStats) -> None:
        """Every rank, after that: the launcher's report (in the background for an
        asynchronous save; the other callbacks may hear of the checkpoint before it)."""
        if self.ctx.launcher is not None:
            self.ctx.launcher.report(record | {"checkpoint": stats.path.uri})

    def _hand_back(self, block: bool, blocked_since: float | None = None) -> None:
        """Tell the other callbacks of the asynchronous save in flight once it is committed
        (``block``: wait until it is over). Raises its error if it failed, as a synchronous
        save would.

        Args:
            block: wait for it.
            blocked_since: ``time.perf_counter()`` when the loop began to wait for it, if
                it waited for its commit too (None: only for its copy).
        """
        if self.saver is None:
            return
        stats = self.saver.wait() if block else self.saver.poll()
        if stats is None:
            return
        if blocked_since is not None:
            stats = dataclasses.replace(stats, blocked=time.perf_counter() - blocked_since)
        self.ctx.callbacks.on_save(stats, self._t0)

    def on_end(self, status: str) -> None:
        # Normally nothing is in flight here (the last step waited for its save); after a
        # failure a save may be: it is a consistent state of an earlier step, so it is
        # committed rather than left half-written. The other callbacks have ended by now.
        if self.saver is None or not self.saver.in_flight:
            return
        try:
            stats = self.saver.wait()  # None: committed and told of before
        except Exception as e:
            if self.ctx.rank == 0:
                say(f"warning: the checkpoint in flight as the attempt ended was not saved: {e}")
            return
        if stats is not None and self.ctx.rank == 0:
            say(f"checkpoint {stats.path.name} committed as the attempt ended ({status})")
