"""The GPU-hours ledger: where every device-second of a run went, across crashes and restarts.

Rank 0 of each training attempt appends intervals to ``<run_dir>/ledger/attempt-<k>.jsonl``
(a new log per attempt, a :class:`~crucible.cluster.storage.JsonlLog`) as they end: start-up,
each step (with its data wait), checkpoints (committed or not), evaluations, idle time. Records
are made durable at checkpoints and at the end, and at most every second otherwise (on object
stores, which cannot append, by rewriting the current segment), so a killed process or a
machine crash loses at most that much.

:func:`account` reads the ledger after the fact. Whether a step was *productive* is only
known in hindsight: a step counts if the run's final state descends from it, i.e. it was
followed by a committed checkpoint that the run continued from (or the run finished). Steps
after the last checkpoint an attempt committed, when that attempt died, are *lost*; while an
attempt is still running they are *uncommitted*. Time between the end of one attempt (its
last record: a dead attempt has no end record) and the start of the next counts as start-up.

One line per record::

    {"kind": "attempt", "attempt": 2, "t": 1700000000.0, "devices": 8, "resumed_from": 400}
    {"kind": "step", "t0": ..., "t1": ..., "devices": 8, "step": 401, "data_wait": 0.02}
    {"kind": "checkpoint", "t0": ..., "t1": ..., "devices": 8, "step": 500, "committed": true}
    {"kind": "end", "t": ..., "status": "finished"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from crucible.cluster.storage import JsonlLog, Location, location, read_lines

log = logging.getLogger(__name__)

LEDGER_DIR = "ledger"
INTERVAL_KINDS = ("startup", "step", "data_wait", "checkpoint", "eval", "idle")
PHASES = (
    "productive", "lost", "uncommitted", "checkpoint", "data_wait", "eval", "startup", "idle",
)  # fmt: skip


class LedgerWriter:
    """Appends one attempt's intervals (rank 0 calls it for all devices of the attempt).

    Every method is exception-safe: a full disk is logged once and training goes on.

    Args:
        run_dir: the run directory.
        devices: devices (workers) this attempt holds.
        resumed_from: step of the checkpoint this attempt resumed from (0: fresh start).
        start_time: when the attempt's devices were taken (default: this process's start,
            but not before the previous attempt's last record).
        device: device description, for the record.
        fsync_every_s: fsync at most this often, besides checkpoints and the end.
    """

    def __init__(
        self,
        run_dir: Location | str | Path,
        devices: int,
        resumed_from: int = 0,
        start_time: float | None = None,
        device: str = "",
        fsync_every_s: float | None = None,
    ) -> None:
        run_dir = location(run_dir)
        self.devices = int(devices)
        if start_time is None:
            # A worker process may predate its attempt (Ray reuses idle workers): the attempt
            # cannot have taken its devices before the previous attempt's last record.
            start_time = max(_process_start(), _last_record_time(run_dir))
        self.start_time = start_time
        self._log: JsonlLog | None = None
        self._warned = False
        self.attempt = -1
        d = run_dir / LEDGER_DIR
        try:
            self.attempt = 1 + max((_attempt_index(n) for n in d.ls()), default=0)
            if fsync_every_s is None:
                fsync_every_s = 1.0
            self._log = JsonlLog(d / f"attempt-{self.attempt}.jsonl", sync_every_s=fsync_every_s)
        except (OSError, ValueError) as e:
            log.warning("GPU-hours ledger disabled: cannot create it in %s (%s)", run_dir, e)
            return
        self._append(
            {"kind": "attempt", "attempt": self.attempt, "t": self.start_time,
             "devices": self.devices, "resumed_from": int(resumed_from), "device": device},
            sync=True,
        )  # fmt: skip

    def _append(self, record: dict[str, Any], sync: bool = False) -> None:
        if self._log is None:
            return
        try:
            self._log.append(record, sync=sync)
        except (OSError, TypeError, ValueError) as e:
            if not self._warned:
                self._warned = True
                log.warning("GPU-hours ledger write failed (%s); training continues", e)

    def interval(self, kind: str, t0: float, t1: float, **fields: Any) -> None:
        """Record ``[t0, t1]`` (unix seconds) of all devices spent in ``kind``.

        Args:
            kind: one of ``startup step data_wait checkpoint eval idle``.
            t0: start (``time.time()``).
            t1: end.
            **fields: extra fields (``step``, ``committed``, ``data_wait``).
        """
        self._append({"kind": kind, "t0": t0, "t1": t1, "devices": self.devices, **fields},
                     sync=kind == "checkpoint")  # fmt: skip

    def startup_done(self, t: float | None = None) -> None:
        """Close the start-up interval: from the attempt's start to ``t`` (default now).

        Args:
            t: when the first step begins.
        """
        self.interval("startup", self.start_time, time.time() if t is None else t)

    def step(self, step: int, t0: float, t1: float, data_wait_seconds: float = 0.0) -> None:
        """Record one optimizer step; ``data_wait_seconds`` of it waited for the batch.

        Args:
            step: steps done after this one.
            t0: step start.
            t1: step end.
            data_wait_seconds: part of the step spent waiting for data.
        """
        self.interval("step", t0, t1, step=int(step), data_wait=float(data_wait_seconds))

    def checkpoint(self, step: int, t0: float, t1: float, committed: bool = True) -> None:
        """Record a checkpoint save (fsync'd: productive time hinges on it).

        Args:
            step: the checkpoint's step.
            t0: save start.
            t1: commit (or failure) time.
            committed: whether the checkpoint was committed.
        """
        self.interval("checkpoint", t0, t1, step=int(step), committed=bool(committed))

    def end(self, status: str = "finished") -> None:
        """Mark the attempt over (optional: a dead attempt is inferred from its last record).

        Args:
            status: ``finished`` (the run is done) or ``failed``.
        """
        self._append({"kind": "end", "t": time.time(), "status": status}, sync=True)
        self.close()

    def close(self) -> None:
        """Close the log (no more records)."""
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def _process_start() -> float:
    """Unix time this process started.

    From ``/proc``: start ticks and uptime share one clock, so their difference is exact;
    psutil's create time adds the boot time, which is rounded (and drifts in VMs) by up to
    seconds.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _last_record_time(run_dir: Location) -> float:
    """Unix time of the newest record of any earlier attempt (0 if none)."""
    try:
        attempts, _ = read_attempts(run_dir)
    except OSError:
        return 0.0
    return max((a.end for a in attempts), default=0.0)


def _attempt_index(name: str) -> int:
    """``k`` of ``attempt-<k>.jsonl`` (and of its segments), else 0."""
    m = re.match(r"^attempt-(\d+)\.jsonl", name)
    return int(m.group(1)) if m else 0


@dataclass
class Attempt:
    """One attempt as read back from its file."""

    index: int
    start: float
    end: float
    devices: int
    resumed_from: int
    status: str | None  # "finished" / "failed" from an end record; None if it has none
    records: list[dict[str, Any]] = field(default_factory=list)


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


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
        return None
    kind = rec["kind"]
    try:
        if kind in INTERVAL_KINDS:
            rec["t0"], rec["t1"] = float(rec["t0"]), float(rec["t1"])
            if not (math.isfinite(rec["t0"]) and math.isfinite(rec["t1"])) or rec["t1"] < rec["t0"]:
                return None
            rec["devices"] = int(rec["devices"])
        elif kind in ("attempt", "end"):
            rec["t"] = float(rec["t"])
        else:
            return None
        if kind == "step":
            rec["step"] = int(rec["step"])
    except (KeyError, TypeError, ValueError):
        return None
    return rec


def read_attempts(run_dir: Location | str | Path) -> tuple[list[Attempt], int]:
    """Parse every attempt log of a run; return the attempts in order and corrupt lines.

    Args:
        run_dir: the run directory.
    """
    attempts: list[Attempt] = []
    corrupt = 0
    d = location(run_dir) / LEDGER_DIR
    for index in sorted({_attempt_index(n) for n in d.ls()} - {0}):
        try:
            lines = read_lines(d / f"attempt-{index}.jsonl")
        except OSError:
            continue
        recs = []
        for line in lines:
            if not line.strip():
                continue
            rec = _parse_line(line)
            if rec is None:
                corrupt += 1
            else:
                recs.append(rec)
        head = next((r for r in recs if r["kind"] == "attempt"), None)
        intervals = [r for r in recs if r["kind"] in INTERVAL_KINDS]
        end = next((r for r in recs if r["kind"] == "end"), None)
        times = [r["t1"] for r in intervals] + ([end["t"]] if end else [])
        starts = [r["t0"] for r in intervals] + ([head["t"]] if head else [])
        if not starts:
            continue
        devices = int(head["devices"]) if head else max(r["devices"] for r in intervals)
        start = min(starts)
        attempts.append(
            Attempt(
                index=index,
                start=start,
                end=max(times, default=start),
                devices=devices,
                resumed_from=int(head.get("resumed_from") or 0) if head else -1,
                status=str(end.get("status")) if end else None,
                records=intervals,
            )
        )
    return attempts, corrupt


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
    timeline: list[tuple[float, str, float]] = []

    def add(t: float, phase: str, device_seconds: float) -> None:
        if device_seconds > 0:
            secs[phase] += device_seconds
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
        windows[a.index] = (a.resumed_from, int(min(upper, own)))
        upper = min(upper, a.resumed_from)
    prev_end: float | None = None
    for a in attempts:
        if prev_end is not None:
            add(a.start, "startup", max(0.0, a.start - prev_end) * a.devices)
        prev_end = a.end
        lo, hi = windows[a.index]
        alive = a is last and running
        busy = 0.0
        for r in sorted(a.records, key=lambda r: r["t1"]):
            d = r["devices"]
            span = r["t1"] - r["t0"]
            busy += span
            if r["kind"] == "step":
                wait = min(span, max(0.0, float(r.get("data_wait") or 0.0)))
                add(r["t1"], "data_wait", wait * d)
                n = r["step"]
                phase = "productive" if lo < n <= hi else ("uncommitted" if alive else "lost")
                add(r["t1"], phase, (span - wait) * d)
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
    )


def _committed(a: Attempt) -> int:
    return max(
        (int(r.get("step", 0)) for r in a.records
         if r["kind"] == "checkpoint" and r.get("committed")),
        default=a.resumed_from if a.resumed_from > 0 else 0,
    )  # fmt: skip


class LedgerCollector(Collector):
    """Exports a run's ledger as ``crucible_gpu_seconds_total{phase}`` at each scrape.

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
        yield GaugeMetricFamily(
            "crucible_gpu_uncommitted_seconds",
            "Device-seconds of steps after the last committed checkpoint.",
            value=s.seconds["uncommitted"],
        )
        yield GaugeMetricFamily(
            "crucible_ledger_corrupt_lines", "Unreadable ledger lines skipped.",
            value=s.corrupt_lines,
        )  # fmt: skip
