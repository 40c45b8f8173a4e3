"""Checkpoints every ``checkpoint.every_steps`` steps, at the last step and at a graceful stop's
step (unless the stop asks for none): every rank's shards and RNG state plus crucible's state,
committed atomically (see :mod:`crucible.jobs.train.checkpoint`); then retention, and one
``ray.train.report``.

With ``checkpoint.async_save`` (the default) the loop waits only while DeepSpeed builds the
state dicts; the copy to host memory overlaps the next step's forward and backward (the loop
waits for it, :meth:`CheckpointerCallback.wait_staged`, before the optimizer step), and the
writing, the commit, retention and the report run in the background. The other callbacks
hear of the checkpoint (``on_save``) at the first step end after its commit, with the spans
of time the loop waited for it (``SaveStats.blocked_spans``, plus ``staging_wait``): what
the ledger bills to the save, since its writing overlaps the steps after it. A save waits for the one
before it; the run's last step waits for its own save, so nothing is left in flight when
the loop ends (and the attempt's end waits for one a failure left, and tells of it).
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
        self._spans: list[tuple[float, float]] = []  # and when it has waited for it so far
        self._staging_wait = 0.0  # seconds steps waited for its copy to host memory

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
            self._flush()  # the loop ends: its last save is committed first

    def wait_staged(self) -> float:
        """Before the optimizer step: wait until the save in flight has its own copy of the
        state; return the seconds waited (the step's ledger record bills them)."""
        if self.saver is None:
            return 0.0
        waited = self.saver.wait_staged()
        self._staging_wait += waited
        return waited

    def _save_sync(self, result: StepResult) -> None:
        ctx = self.ctx
        t0, p0 = time.time(), time.perf_counter()
        self._hand_back(block=True)  # one left by an asynchronous save: its wait is this one's
        stats = ckpt.save(ctx.engine, ctx.checkpoints, result.step, self.state(), ctx.rank,
                          ctx.world)  # fmt: skip
        # Ray Train's report is a barrier that waits for the controller's next poll (every
        # 2 s): once per checkpoint, not per step. It comes before on_save, so that the
        # ledger's checkpoint interval holds it.
        stats = self._retain(stats)
        self._report(result.record(), stats)
        blocked = ((t0, t0 + time.perf_counter() - p0),)
        ctx.callbacks.on_save(dataclasses.replace(stats, blocked_spans=blocked), t0)

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
        # The loop's wait for this save so far: for the previous one, then the copy. Only
        # this is billed to the save; its writing overlaps the steps after it.
        self._t0, self._spans = t0, [(t0, t0 + time.perf_counter() - p0)]
        self._staging_wait = 0.0
        if ending:  # nothing may be in flight once the loop is over: wait for the commit
            self._hand_back(block=True, since=(t0, p0))

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

    def _flush(self) -> bool:
        """The loop is over with a save in flight: wait for it, and bill the wait to it."""
        return self._hand_back(block=True, since=(time.time(), time.perf_counter()))

    def _hand_back(self, block: bool, since: tuple[float, float] | None = None) -> bool:
        """Tell the other callbacks of the asynchronous save in flight once it is committed
        (``block``: wait until it is over), with the spans the loop waited for it; return
        whether they were told now. Raises its error if it failed, as a synchronous save
        would.

        Args:
            block: wait for it.
            since: unix time and ``time.perf_counter()`` when the loop began to wait, if the
                wait is this save's (None: it is the next save's, which began then).
        """
        if self.saver is None or not self.saver.in_flight:
            return False
        stats = self.saver.wait() if block else self.saver.poll()
        if since is not None:
            self._spans.append((since[0], since[0] + time.perf_counter() - since[1]))
        # None: still writing, or told of already (a wait for the launcher's report after
        # its commit is then billed to no save)
        if stats is None:
            return False
        told = dataclasses.replace(
            stats, blocked_spans=_union(self._spans), staging_wait=self._staging_wait
        )
        self.ctx.callbacks.on_save(told, self._t0)
        return True

    def on_end(self, status: str) -> None:
        # Normally nothing is in flight here (the last step waited for its save); after a
        # failure a save may be: it is a consistent state of an earlier step, so it is
        # committed rather than left half-written, and told of like any other. The callbacks
        # it reports to end after this one (see :meth:`.Callbacks.on_end`).
        if self.saver is None or self.saver.step is None:
            return
        name = f"step-{self.saver.step}"
        try:
            told = self._flush()
        except Exception as e:
            if self.ctx.rank == 0:
                say(f"warning: checkpoint {name}, in flight as the attempt ended, was not "
                    f"saved: {e}")  # fmt: skip
            return
        if told and self.ctx.rank == 0:
            say(f"checkpoint {name} committed as the attempt ended ({status})")


def _union(spans: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Overlapping spans merged (the wait up to an ending save's commit covers its copy)."""
    out: list[tuple[float, float]] = []
    for t0, t1 in sorted(spans):
        if out and t0 <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t1))
        else:
            out.append((t0, t1))
    return tuple(out)
