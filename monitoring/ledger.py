"""The GPU-hours ledger: where every device-second of a run went, across crashes and restarts.

Rank 0 of each training attempt appends intervals to ``<run_dir>/ledger/attempt-<k>.jsonl``
(a new log per attempt, a :class:`~crucible.cluster.storage.JsonlLog`) as they end: start-up,
each step (with its data wait), checkpoints (committed or not), evaluations, idle time. Records
are made durable at checkpoints and at the end, and at most every second otherwise (on object
stores, which cannot append, by rewriting the current segment), so a killed process or a
machine crash loses at most that much. A checkpoint's interval is the time training waited
for its save: all of a synchronous save, an asynchronous one's snapshot (its writing
overlaps the steps after it, billed as steps: billing it too would count that wall time
twice), and one more interval if the loop ended with it in flight and waited for it. The
part of a step that waited for a save's copy to host memory (``checkpoint_wait`` in the
step's record) is billed to checkpoints too.

:func:`account` reads the ledger after the fact. Whether a step was *productive* is only
known in hindsight: a step counts if the run's final state descends from it, i.e. it was
followed by a committed checkpoint that the run continued from (or the run finished). Steps
after the last checkpoint an attempt committed, when that attempt died, are *lost*; while an
attempt is still running they are *uncommitted*.

Time between the end of one attempt (its last record: a dead attempt has no end record) and
the start of the next is one of two things. Inside one job (Ray Train restarting the worker
group after a crash or a hang) it is restart time, billed as start-up. Across jobs (a job
was submitted in the gap: ``<run>/jobs.jsonl``; or, without that log, the attempt ended as
``finished`` or ``stopped``) the run was not running: the time until the new submission is
*paused* and the time from it to the new attempt's start is *queued*, both wall time,
billed to no phase and outside goodput. (A job that died after its last record is billed
only to that record: when it died is not in the ledger.)

Besides phases, badput is split by cause (:data:`CAUSES`): the first start-up, restarts,
hangs and checkpoint loads (all in the ``startup`` phase), checkpoint saves, lost work, data
waits, evaluations, idle time, rollbacks and preemptions. A rollback (after a loss spike or
a non-finite loss, the attempt reloads its last checkpoint in-process) records one interval
from the start of the bad step to the end of the reload, with the step it went back to: that
interval and every earlier step of the attempt past that step are wasted, in the ``lost``
phase. A preempted attempt (SIGTERM: every rank stopped after its step with a checkpoint of
it, end status ``preempted``) loses no step; its extra save (``"preemption": true``, unless
a save was due then anyway) and the restart gap after it inside the same job are billed to
cause ``preemption`` (phases ``checkpoint`` and ``startup``).

One line per record::

    {"kind": "attempt", "attempt": 2, "t": 1700000000.0, "devices": 8, "resumed_from": 400}
    {"kind": "step", "t0": ..., "t1": ..., "devices": 8, "step": 401, "data_wait": 0.02,
     "checkpoint_wait": 0.01}
    {"kind": "checkpoint", "t0": ..., "t1": ..., "devices": 8, "step": 500, "committed": true}
    {"kind": "checkpoint", ..., "step": 517, "committed": true, "preemption": true}
    {"kind": "hang", "t0": ..., "t1": ..., "devices": 8}
    {"kind": "rollback", "t0": ..., "t1": ..., "devices": 8, "step": 400, "from_step": 437}
    {"kind": "end", "t": ..., "status": "finished"}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from crucible.cluster.storage import Location, location
from crucible.monitoring.ledger_format import (
    ENDED_BY_USER,
    INTERVAL_KINDS,
    LEDGER_DIR,
    PHASES,
    Attempt,
    read_attempts,
    read_submissions,
)
from crucible.monitoring.ledger_writer import LedgerWriter

__all__ = [
    "CAUSES",
    "INTERVAL_KINDS",
    "LEDGER_DIR",
    "PHASES",
    "Attempt",
    "LedgerCollector",
    "LedgerSummary",
    "LedgerWriter",
    "account",
    "read_attempts",
]

log = logging.getLogger(__name__)

# Where device time went, finer than PHASES: productive, then each cause of badput.
CAUSES = (
    "productive", "startup", "restart", "hang", "checkpoint_load", "checkpoint_save", "lost",
    "data_wait", "eval", "idle", "uncommitted", "rollback", "preemption",
)  # fmt: skip
_CAUSE_OF_PHASE = {"checkpoint": "checkpoint_save"}
# Clocks of the submitting machine and the workers may disagree by this much.
SUBMIT_SKEW_S = 60.0


@dataclass
class LedgerSummary:
    """Device-seconds of a run by phase, and what follows from them.

    ``seconds`` are device-seconds (interval × devices); GPU-hours = seconds / 3600.
    """

    seconds: dict[str, float]
    attempts: int
    corrupt_lines: int
    finished: bool
    running: bool
    wall_seconds: float
    devices: int
    cost: float | None = None
    energy_kwh: float | None = None
    timeline: list[tuple[float, str, float]] = field(default_factory=list)
    start_time: float | None = None  # unix time the first attempt took its devices
    causes: dict[str, float] = field(default_factory=dict)  # device-seconds by CAUSES
    paused_seconds: float = 0.0  # wall time between a job's end and the next submission
    queued_seconds: float = 0.0  # wall time from a submission to its attempt's start
    pauses: int = 0

    @property
    def total_seconds(self) -> float:
        """All device-seconds accounted for."""
        return sum(self.seconds.values())

    @property
    def gpu_hours(self) -> float:
        """Total device-hours."""
        return self.total_seconds / 3600

    @property
    def goodput(self) -> float:
        """Productive share of all device time (0–1; NaN for an empty ledger)."""
        total = self.total_seconds
        return self.seconds["productive"] / total if total > 0 else math.nan

    @property
    def badput(self) -> dict[str, float]:
        """Device-seconds of every cause but ``productive`` (zeros included)."""
        return {c: self.causes.get(c, 0.0) for c in CAUSES if c != "productive"}


def account(
    run_dir: Location | str | Path,
    price_per_device_hour: float | None = None,
    watts_per_device: float | None = None,
    now: float | None = None,
    stale_after_s: float = 600.0,
) -> LedgerSummary:
    """Device-seconds of a run by phase (see the module docstring for the rules).

    Args:
        run_dir: the run directory.
        price_per_device_hour: $ per GPU-hour, for ``cost``.
        watts_per_device: average draw per device, for ``energy_kwh``.
        now: the time to judge staleness at (default: now).
        stale_after_s: the last attempt, without an end record and silent this long, is
            taken as dead (its uncommitted steps become lost). ``inf``: always alive.
    """
    attempts, corrupt = read_attempts(run_dir)
    now = time.time() if now is None else now
    secs = dict.fromkeys(PHASES, 0.0)
    causes = dict.fromkeys(CAUSES, 0.0)
    timeline: list[tuple[float, str, float]] = []

    def add(t: float, phase: str, device_seconds: float, cause: str | None = None) -> None:
        if device_seconds > 0:
            secs[phase] += device_seconds
            causes[cause or _CAUSE_OF_PHASE.get(phase, phase)] += device_seconds
            timeline.append((t, phase, device_seconds))

    for i, a in enumerate(attempts):  # unknown resume points: the last committed checkpoint
        if a.resumed_from < 0:
            a.resumed_from = max((_committed(b) for b in attempts[:i]), default=0)
    last = attempts[-1] if attempts else None
    finished = last is not None and last.status == "finished"
    running = last is not None and last.status is None and now - last.end < stale_after_s
    # Walk back from the final state: each attempt contributes the steps between its resume
    # point and the point the next attempt resumed from.
    windows: dict[int, tuple[int, int]] = {}
    upper = math.inf
    for a in reversed(attempts):
        top = max((r["step"] for r in a.records if r["kind"] == "step"), default=0)
        own = top if (a is last and finished) else _committed(a)
        if a.resumed_from < upper <= top:
            # The next attempt resumed from a step this one trained: this one committed it,
            # even if it died before recording the commit (an asynchronous save commits in
            # the background, and its record follows).
            own = max(own, int(upper))
        windows[a.index] = (a.resumed_from, int(min(upper, own)))
        upper = min(upper, a.resumed_from)
    submissions = read_submissions(run_dir)
    paused = queued = 0.0
    pauses = 0
    if attempts:
        first = [s for s in submissions if s <= attempts[0].start + SUBMIT_SKEW_S]
        queued += max(0.0, attempts[0].start - first[-1]) if first else 0.0
    prev: Attempt | None = None
    for a in attempts:
        if prev is not None:
            gap = max(0.0, a.start - prev.end)
            cut = _resubmission(submissions, prev, a)
            if cut is not None or prev.status in ENDED_BY_USER:
                wait = gap if cut is None else min(gap, max(0.0, cut - prev.end))
                paused += wait
                queued += gap - wait
                pauses += 1
            else:
                why = "preemption" if prev.status == "preempted" else "restart"
                add(a.start, "startup", gap * a.devices, why)
        prev = a
        lo, hi = windows[a.index]
        alive = a is last and running
        busy = 0.0
        startups = [r for r in a.records if r["kind"] == "startup"]
        rollbacks = [r for r in a.records if r["kind"] == "rollback"]
        for r in sorted(a.records, key=lambda r: r["t1"]):
            d = r["devices"]
            span = r["t1"] - r["t0"]
            if r["kind"] == "checkpoint_load":
                # Loading happens inside start-up: that part is moved from cause to cause.
                inside = min(span, sum(_overlap(r, s) for s in startups))
                causes["startup"] -= inside * d
                causes["checkpoint_load"] += inside * d
                busy += span - inside
                add(r["t1"], "startup", (span - inside) * d, "checkpoint_load")
                continue
            busy += span
            if r["kind"] == "step" and _rolled_back(r, rollbacks):
                add(r["t1"], "lost", span * d, "rollback")
            elif r["kind"] == "step":
                wait = min(span, max(0.0, float(r.get("data_wait") or 0.0)))
                add(r["t1"], "data_wait", wait * d)
                saving = min(span - wait, max(0.0, float(r.get("checkpoint_wait") or 0.0)))
                add(r["t1"], "checkpoint", saving * d)
                n = r["step"]
                phase = "productive" if lo < n <= hi else ("uncommitted" if alive else "lost")
                add(r["t1"], phase, (span - wait - saving) * d)
            elif r["kind"] == "hang":
                add(r["t1"], "startup", span * d, "hang")
            elif r["kind"] == "rollback":
                add(r["t1"], "lost", span * d, "rollback")
            elif r["kind"] == "checkpoint" and r.get("preemption"):
                add(r["t1"], "checkpoint", span * d, "preemption")
            else:
                add(r["t1"], r["kind"], span * d)
        add(a.end, "idle", max(0.0, (a.end - a.start) - busy) * a.devices)
    timeline.sort()
    total = sum(secs.values())
    return LedgerSummary(
        seconds=secs,
        attempts=len(attempts),
        corrupt_lines=corrupt,
        finished=finished,
        running=running,
        wall_seconds=(last.end - attempts[0].start) if last else 0.0,
        devices=last.devices if last else 0,
        cost=total / 3600 * price_per_device_hour if price_per_device_hour is not None else None,
        energy_kwh=total * watts_per_device / 3.6e6 if watts_per_device is not None else None,
        timeline=timeline,
        start_time=attempts[0].start if attempts else None,
        causes=causes,
        paused_seconds=paused,
        queued_seconds=queued,
        pauses=pauses,
    )


def _resubmission(submissions: list[float], prev: Attempt, nxt: Attempt) -> float | None:
    """The latest job submission in the gap between two attempts (None: the same job)."""
    inside = [
        s for s in submissions
        if prev.end - SUBMIT_SKEW_S <= s <= nxt.start + SUBMIT_SKEW_S and s > prev.start
    ]  # fmt: skip
    return max(inside) if inside else None


def _rolled_back(step: dict[str, Any], rollbacks: list[dict[str, Any]]) -> bool:
    """Whether a later rollback of its attempt went back to before this step."""
    return any(
        step["t1"] <= rb["t1"] and step["step"] > int(rb.get("step") or 0) for rb in rollbacks
    )


def _overlap(r: dict[str, Any], s: dict[str, Any]) -> float:
    return max(0.0, min(r["t1"], s["t1"]) - max(r["t0"], s["t0"]))


def _committed(a: Attempt) -> int:
    return max(
        (int(r.get("step", 0)) for r in a.records
         if r["kind"] == "checkpoint" and r.get("committed")),
        default=a.resumed_from if a.resumed_from > 0 else 0,
    )  # fmt: skip


class LedgerCollector(Collector):
    """Exports a run's ledger as ``crucible_gpu_seconds_total{phase}`` at each scrape, with
    ``crucible_gpu_badput_seconds_total{cause}`` and the paused wall time.

    Registered by the live rank 0, which is running by definition, so its uncommitted steps
    are exported as the gauge ``crucible_gpu_uncommitted_seconds`` (they become productive or
    lost later) and every ``_total`` series only grows. The ledger is re-read only when its
    files changed.

    Args:
        run_dir: the run directory.
    """

    def __init__(self, run_dir: Location | str | Path) -> None:
        self.run_dir = location(run_dir)
        self._key: tuple[Any, ...] = ()
        self._summary: LedgerSummary | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield the per-phase device-second counters (nothing if the ledger is unreadable)."""
        try:
            key = tuple(sorted((self.run_dir / LEDGER_DIR).walk().items()))
            if key != self._key or self._summary is None:
                self._summary = account(self.run_dir, stale_after_s=math.inf)
                self._key = key
        except Exception as e:  # a scrape must never raise into the exporter
            log.debug("ledger unreadable: %s", e)
            return
        s = self._summary
        fam = CounterMetricFamily(
            "crucible_gpu_seconds", "Device-seconds of the run by phase (ledger).",
            labels=["phase"],
        )  # fmt: skip
        for phase, v in s.seconds.items():
            if phase != "uncommitted":
                fam.add_metric([phase], v)
        yield fam
        causes = CounterMetricFamily(
            "crucible_gpu_badput_seconds",
            "Device-seconds of the run that were not productive, by cause (ledger).",
            labels=["cause"],
        )
        for cause, v in s.badput.items():
            if cause != "uncommitted":
                causes.add_metric([cause], v)
        yield causes
        yield GaugeMetricFamily(
            "crucible_run_paused_seconds",
            "Wall seconds the run was stopped between jobs (billed to no phase).",
            value=s.paused_seconds,
        )
        yield GaugeMetricFamily(
            "crucible_gpu_uncommitted_seconds",
            "Device-seconds of steps after the last committed checkpoint.",
            value=s.seconds["uncommitted"],
        )
        yield GaugeMetricFamily(
            "crucible_ledger_corrupt_lines", "Unreadable ledger lines skipped.",
            value=s.corrupt_lines,
        )  # fmt: skip
