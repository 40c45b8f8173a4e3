"""Straggler detection: one slow rank slows every collective, so the step time of the run is
that of its slowest rank, and nothing in the run-wide series says which one it is.

Every rank keeps the time it spent busy in its recent steps (reading its batch and in the
engine); every ``train.straggler_check_every`` steps the ranks all-gather the median of that
window (one float each), and every rank runs the same :class:`StragglerDetector` on the same
numbers. A rank whose median is ``train.straggler_factor`` times that of the other ranks for
``train.straggler_checks`` checks in a row is a straggler: each rank exports its own verdict
(``crucible_train_straggler``, ``crucible_train_rank_slowdown_ratio``), so the series carry
the rank's discovery labels, and rank 0 names the rank and its host in the job log.

The busy time includes the waits inside the engine's own collectives (under ZeRO-3, in every
layer's forward and backward), where the other ranks wait for a slow one, so every rank's
busy time is pulled toward the slowest: what stays apart is work after the step's last
collective (the optimizer shard), and a slow batch read is absorbed whole by the others'
waits. A straggler is understated, never invented; timing the engine's compute apart from
its collectives (and the data wait on its own) would sharpen it without changing the detector.
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.console import say
from crucible.monitoring.safe import never_raise

if TYPE_CHECKING:
    import torch

    from crucible.monitoring.metrics import TrainMetrics

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """One check's outcome, the same on every rank."""

    ratios: list[float]
    """Each rank's busy time over the median of the other ranks (NaN: it had no samples)."""
    median_seconds: float
    """The median of the ranks' busy times."""
    stragglers: list[int]
    """Ranks slow for enough checks in a row."""
    new: list[int]
    """Of those, the ones that became stragglers at this check."""
    recovered: list[int]
    """Ranks that were stragglers until this check."""


@dataclass
class StragglerDetector:
    """Flags ranks slower than the median of the other ranks by ``factor`` for ``checks``
    checks in a row; a single fast check clears a rank's streak.

    Args:
        factor: how many times the median a rank's busy time must be (> 1).
        checks: consecutive slow checks before a rank is reported.
        min_excess_seconds: a rank must also be this much slower than the median, so that
            ratios of near-zero times (an idle step, a tiny model) never flag a rank.
    """

    factor: float = 1.5
    checks: int = 3
    min_excess_seconds: float = 1e-3
    streaks: dict[int, int] = field(default_factory=dict)

    def check(self, busy_seconds: Sequence[float]) -> Verdict:
        """Judge one check: each rank against the median of the other ranks (with two ranks,
        the median of all would hide half of any slowdown).

        Args:
            busy_seconds: each rank's median busy seconds per step (NaN: no samples).
        """
        known = sorted((t, r) for r, t in enumerate(busy_seconds) if math.isfinite(t))
        order = {r: i for i, (_, r) in enumerate(known)}
        values = [t for t, _ in known]
        ratios: list[float] = []
        was = {r for r, n in self.streaks.items() if n >= self.checks}
        for rank, t in enumerate(busy_seconds):
            others = _median_without(values, order[rank]) if rank in order else math.nan
            if not (math.isfinite(t) and math.isfinite(others)) or others <= 0:
                ratios.append(1.0 if math.isfinite(t) else math.nan)
                self.streaks[rank] = 0
                continue
            ratios.append(t / others)
            slow = t >= self.factor * others and t - others >= self.min_excess_seconds
            self.streaks[rank] = self.streaks.get(rank, 0) + 1 if slow else 0
        now = sorted(r for r, n in self.streaks.items() if n >= self.checks)
        return Verdict(
            ratios=ratios,
            median_seconds=statistics.median(values) if values else math.nan,
            stragglers=now,
            new=[r for r in now if r not in was],
            recovered=sorted(was - set(now)),
        )


def _median_without(values: Sequence[float], i: int) -> float:
    """The median of sorted ``values`` without its ``i``-th element (O(1): no copy, as every
    rank judges every rank)."""
    n = len(values) - 1
    if n <= 0:
        return math.nan

    def at(j: int) -> float:
        return values[j if j < i else j + 1]

    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2


def _gather_device(ctx: TrainContext) -> torch.device:
    import torch

    if ctx.engine is not None:  # NCCL gathers on the rank's own device only
        return torch.device(ctx.engine.device)
    if ctx.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_HOST_BYTES = 64


class StragglerCallback(Callback):
    """Every rank: window its busy times, all-gather their medians on check steps, judge.

    Every rank must run it (the gather is a collective); a check is skipped by all ranks
    alike (same spec, same step).

    Args:
        ctx: the rank's training context.
        metrics: the rank's Prometheus metrics, if they started.
    """

    def __init__(self, ctx: TrainContext, metrics: TrainMetrics | None) -> None:
        self.ctx = ctx
        self.metrics = metrics
        t = ctx.spec.train
        self.every = t.straggler_check_every if ctx.world > 1 else 0
        self.detector = StragglerDetector(t.straggler_factor, t.straggler_checks)
        self.window: deque[float] = deque(maxlen=max(1, self.every))
        self.hosts: list[str] = []

    def on_start(self) -> None:
        if not self.every:
            return
        import torch
        import torch.distributed as dist

        # Once: the node a straggler is on. A fixed-size tensor, not all_gather_object, which
        # gathers on the current CUDA device rather than this rank's.
        name = socket.gethostname().encode()[:_HOST_BYTES].ljust(_HOST_BYTES, b"\0")
        mine = torch.tensor(list(name), dtype=torch.uint8, device=_gather_device(self.ctx))
        out = [torch.empty_like(mine) for _ in range(self.ctx.world)]
        dist.all_gather(out, mine)
        self.hosts = [bytes(t.tolist()).rstrip(b"\0").decode(errors="replace") for t in out]

    @never_raise
    def _record(self, result: StepResult) -> None:
        self.window.append(result.data_wait_seconds + result.engine_seconds)

    def _local_median(self) -> float:
        try:
            return statistics.median(self.window) if self.window else math.nan
        except Exception:
            return math.nan

    def on_step_end(self, result: StepResult) -> None:
        if not self.every:
            return
        self._record(result)
        if result.step % self.every:
            return
        # Every rank reaches the gather on the same step whatever its own bookkeeping did.
        busy = self.gather(self._local_median())
        self._report(busy)

    def gather(self, value: float) -> list[float]:
        """Every rank's ``value`` (one float each, in rank order).

        Args:
            value: this rank's median busy seconds.
        """
        import torch
        import torch.distributed as dist

        device = _gather_device(self.ctx)
        mine = torch.tensor([value], dtype=torch.float64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.ctx.world)]
        dist.all_gather(out, mine)
        return [float(t.item()) for t in out]

    @never_raise
    def _report(self, busy: list[float]) -> None:
        verdict = self.detector.check(busy)
        rank = self.ctx.rank
        self.window.clear()
        if self.metrics is not None:
            self.metrics.on_straggler_check(
                busy[rank], verdict.ratios[rank], rank in verdict.stragglers
            )
        if rank != 0:
            return
        for r in verdict.new:
            say(
                f"straggler: rank {r} on {self._host(r)} is {verdict.ratios[r]:.2f}x as busy "
                f"as the other ranks ({busy[r]:.3f}s per step, median {verdict.median_seconds:.3f}s) "
                f"for {self.detector.checks} checks; every collective waits for it"
            )
        for r in verdict.recovered:
            say(f"straggler: rank {r} on {self._host(r)} is back within the factor")

    def _host(self, rank: int) -> str:
        return self.hosts[rank] if rank < len(self.hosts) else "?"
