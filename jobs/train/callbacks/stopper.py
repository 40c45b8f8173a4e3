"""Stopping between steps, asked for in two ways, agreed on by one collective per step:

- a graceful stop: ``crucible jobs stop`` writes ``<run>/control/stop.json``; rank 0 notices
  it (a background thread polls the run's storage, so no step waits on it);
- a preemption: a rank got SIGTERM (:mod:`.preemption`; ``train.preemption_checkpoint``).

After every step the ranks all-reduce (MAX) two small integers, rank 0's stop request and
the highest signalled rank + 1, so every rank stops after the same step, however many ranks
were signalled and whichever they are. The loop then ends after that step with a checkpoint
of it (a stop may ask for none; a preemption always saves). A stop ends the attempt as
``stopped`` and the job ends by itself, its workers gone, before the CLI returns. A
preemption ends it as ``preempted`` in the ledger (the extra save and the restart after it
are badput of cause ``preemption``), with a ``preempted`` record in ``metrics.jsonl``, and
every rank raises :class:`.Preempted`: Ray Train restarts the group
(``train.max_failures``) and it resumes from that checkpoint, no step lost; under torchrun
the ranks exit non-zero and running it again resumes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from crucible.cluster.storage import JsonlLog
from crucible.jobs.runs import stop_request
from crucible.jobs.train.callbacks import preemption
from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.checkpoint import SaveStats
from crucible.jobs.train.console import say

if TYPE_CHECKING:
    from crucible.jobs.train.callbacks.ledger import LedgerCallback

POLL_S = 1.0
# rank 0's stop request, as reduced: the larger wins
NO_STOP, STOP_WITHOUT_CHECKPOINT, STOP_WITH_CHECKPOINT = 0, 1, 2


class StopCallback(Callback):
    """Ends the loop after the step during which a stop was requested or a rank was
    signalled.

    Args:
        ctx: the rank's training context.
        ledger: told of a preemption before its checkpoint is saved.
        log: ``metrics.jsonl`` (rank 0; None elsewhere).
        poll_s: how often rank 0 looks for a request.
    """

    def __init__(
        self,
        ctx: TrainContext,
        ledger: LedgerCallback | None = None,
        log: JsonlLog | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.log = log
        self.poll_s = poll_s
        self.request: dict[str, Any] | None = None
        self.preempted_rank: int | None = None
        """The highest rank that got SIGTERM, once the ranks agreed to stop for it."""
        self._seen = threading.Event()
        self._done = threading.Event()
        self._on_ray = ctx.launcher is not None and ctx.launcher.name == "ray"
        self._handler = False
        self._step_seconds = 0.0
        self._warned = False

    def on_start(self) -> None:
        if self.ctx.spec.train.preemption_checkpoint:
            self._handler = preemption.install(self._on_ray)
        if self.ctx.rank == 0:
            threading.Thread(target=self._poll, name="crucible-stop", daemon=True).start()

    def _poll(self) -> None:
        where = stop_request(self.ctx.run_dir)
        while not self._done.wait(self.poll_s):
            with contextlib.suppress(OSError, ValueError):
                data = where.read_json()
                self.request = data if isinstance(data, dict) else {}
                self._seen.set()
                return

    def _local_flags(self) -> list[int]:
        request = NO_STOP
        if self._seen.is_set():
            wants = bool((self.request or {}).get("checkpoint", True))
            request = STOP_WITH_CHECKPOINT if wants else STOP_WITHOUT_CHECKPOINT
        signalled = self.ctx.rank + 1 if self._handler and preemption.signalled_at() else 0
        return [request, signalled]

    def on_step_end(self, result: StepResult) -> None:
        self._step_seconds = result.seconds
        # every rank joins the all-reduce at every step, so all agree on the step to stop at
        flags = torch.tensor(self._local_flags(), dtype=torch.int32)
        if self.ctx.engine is not None and self.ctx.engine.device.type == "cuda":
            flags = flags.to(self.ctx.engine.device)
        if self.ctx.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        request, signalled = (int(v) for v in flags.tolist())
        if self.ctx.stop_requested or not (request or signalled):
            return
        self.ctx.stop_requested = True
        # a SIGTERM always saves; a user's stop wins over it (the job is to end, not restart)
        self.ctx.stop_checkpoint = request != STOP_WITHOUT_CHECKPOINT or bool(signalled)
        if signalled and not request:
            self.preempted_rank = signalled - 1
            if self.ledger is not None:
                self.ledger.on_preempted(result.step)

    def on_save(self, stats: SaveStats, t0: float) -> None:
        if self.log is None:
            return
        grace = self.ctx.spec.train.preemption_grace_s
        if self.preempted_rank is not None and stats.step == self.ctx.step:
            say(
                f"preempted: SIGTERM on rank {self.preempted_rank}; every rank stopped after "
                f"step {stats.step}, saved as {stats.path.name} in {stats.blocked_seconds:.2f} "
                "s; the next attempt resumes from it"
            )
            self.log.append(
                {"kind": "preempted", "step": stats.step, "rank": self.preempted_rank,
                 "checkpoint": stats.path.uri, "save_seconds": stats.blocked_seconds,
                 "time": time.time()},
                sync=True,
            )  # fmt: skip
        elif grace and not self._warned and self._step_seconds + stats.seconds > grace:
            self._warned = True
            say(
                f"warning: a step ({self._step_seconds:.1f} s) and a checkpoint "
                f"({stats.seconds:.1f} s) take longer than train.preemption_grace_s "
                f"({grace:g} s): a preempted rank may be killed before its checkpoint is "
                "committed"
            )

    def ending(self, total_steps: int) -> str:
        """How the attempt ends once the loop is over: ``finished``, ``stopped`` or
        ``preempted``.

        Args:
            total_steps: the run's planned steps.
        """
        if not self.ctx.stop_requested or self.ctx.step >= total_steps:
            return "finished"
        return "preempted" if self.preempted_rank is not None else "stopped"

    def preempted(self) -> preemption.Preempted:
        """The error every rank ends a preempted attempt with."""
        return preemption.Preempted(
            f"preempted: SIGTERM on rank {self.preempted_rank}; every rank stopped after step "
            f"{self.ctx.step} and committed step-{self.ctx.step}; a restart or `crucible "
            "resume` continues from it"
        )

    def on_end(self, status: str) -> None:
        self._done.set()
        if self._handler:
            preemption.restore(self._on_ray)
            self._handler = False
