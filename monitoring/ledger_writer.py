"""Writing the GPU-hours ledger: rank 0 of each attempt appends its intervals as they end
(see :mod:`.ledger` for the format and the accounting)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from crucible.cluster.storage import JsonlLog, Location, location
from crucible.monitoring.ledger_format import LEDGER_DIR, attempt_index, read_attempts

log = logging.getLogger(__name__)


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
            self.attempt = 1 + max((attempt_index(n) for n in d.ls()), default=0)
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
            kind: one of ``startup step data_wait checkpoint eval idle checkpoint_load
                hang rollback`` (a checkpoint's load within start-up; the hang before a
                watchdog exit; a bad step and the reload after it).
            t0: start (``time.time()``).
            t1: end.
            **fields: extra fields (``step``, ``committed``, ``data_wait``, ``from_step``).
        """
        self._append({"kind": kind, "t0": t0, "t1": t1, "devices": self.devices, **fields},
                     sync=kind in ("checkpoint", "hang", "rollback"))  # fmt: skip

    def startup_done(self, t: float | None = None) -> None:
        """Close the start-up interval: from the attempt's start to ``t`` (default now).

        Args:
            t: when the first step begins.
        """
        self.interval("startup", self.start_time, time.time() if t is None else t)

    def step(
        self,
        step: int,
        t0: float,
        t1: float,
        data_wait_seconds: float = 0.0,
        checkpoint_wait_seconds: float = 0.0,
    ) -> None:
        """Record one optimizer step; ``data_wait_seconds`` of it waited for the batch and
        ``checkpoint_wait_seconds`` for an asynchronous save's copy of the state.

        Args:
            step: steps done after this one.
            t0: step start.
            t1: step end.
            data_wait_seconds: part of the step spent waiting for data.
            checkpoint_wait_seconds: part of the step spent waiting for a save.
        """
        extra = (
            {"checkpoint_wait": float(checkpoint_wait_seconds)} if checkpoint_wait_seconds else {}
        )
        self.interval("step", t0, t1, step=int(step), data_wait=float(data_wait_seconds), **extra)

    def checkpoint(
        self, step: int, t0: float, t1: float, committed: bool = True, preemption: bool = False
    ) -> None:
        """Record a checkpoint save (fsync'd: productive time hinges on it).

        Args:
            step: the checkpoint's step.
            t0: save start.
            t1: commit (or failure) time.
            committed: whether the checkpoint was committed.
            preemption: saved only because of a SIGTERM (badput of cause ``preemption``).
        """
        extra = {"preemption": True} if preemption else {}
        self.interval("checkpoint", t0, t1, step=int(step), committed=bool(committed), **extra)

    def end(self, status: str = "finished") -> None:
        """Mark the attempt over (optional: a dead attempt is inferred from its last record).

        Args:
            status: ``finished`` (the run is done), ``stopped`` (its user stopped it: the
                time until the run is resumed is paused, not billed), ``preempted`` (a
                SIGTERM: stopped with a checkpoint; the time until the next attempt of the
                same job is badput of cause ``preemption``) or ``failed``.
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
