"""The GPU-hours ledger's files: one JSONL log per attempt under ``<run>/ledger/`` (see
:mod:`.ledger` for what the records mean), and reading them back, skipping corrupt lines;
also the run's job submissions (``<run>/jobs.jsonl``), which tell a pause from a restart."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.cluster.storage import Location, location, read_jsonl, read_lines

LEDGER_DIR = "ledger"
JOBS_LOG = "jobs.jsonl"  # one {"job", "submitted_at"} per submission, by ``crucible train``
# checkpoint_load: restoring the checkpoint (inside start-up); hang: from the last progress to
# the watchdog's exit. Both are start-up/restart time by phase and their own badput cause.
# rollback: from the start of a bad step to the end of the reload after it (see .ledger).
INTERVAL_KINDS = (
    "startup", "step", "data_wait", "checkpoint", "eval", "idle", "checkpoint_load", "hang",
    "rollback",
)  # fmt: skip
PHASES = (
    "productive", "lost", "uncommitted", "checkpoint", "data_wait", "eval", "startup", "idle",
)  # fmt: skip
# End statuses after which the run waits for its user: the gap to the next attempt is paused.
ENDED_BY_USER = ("finished", "stopped")


def attempt_index(name: str) -> int:
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
    status: str | None  # finished / stopped / preempted / failed from an end record, or None
    records: list[dict[str, Any]] = field(default_factory=list)


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
    for index in sorted({attempt_index(n) for n in d.ls()} - {0}):
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


def read_submissions(run_dir: Location | str | Path) -> list[float]:
    """Unix times the run's jobs were submitted, in order (empty if unknown or unreadable).

    Args:
        run_dir: the run directory.
    """
    try:
        recs = read_jsonl(location(run_dir) / JOBS_LOG)
    except OSError:
        return []
    times = []
    for r in recs:
        try:
            t = float(r["submitted_at"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(t):
            times.append(t)
    return sorted(times)
