"""A run's state read from its own files: ``metrics.jsonl``, the ledger, the resolved spec,
and Prometheus's alerts when it can be reached. Used by ``crucible monitor`` and ``report``.

``metrics.jsonl`` lines are read tolerantly: unknown fields are ignored, unreadable lines
skipped and counted. Step records are ``{"kind": "step", "step", "loss", "lr", "grad_norm",
"tokens", "step_seconds", "time", ...}`` (``kind`` may be absent); ``checkpoint`` and
``resume`` records mark saves and restarts. A step redone after a restart replaces the
earlier record of the same step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crucible.cluster.storage import Location, location, read_lines
from crucible.monitoring.ledger import LedgerSummary, account

METRICS = "metrics.jsonl"


@dataclass
class RunRecords:
    """The parsed ``metrics.jsonl``."""

    steps: list[dict[str, Any]] = field(default_factory=list)  # by step, last attempt wins
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    ppo: list[dict[str, Any]] = field(default_factory=list)  # a PPO run's steps, as steps
    corrupt_lines: int = 0


def as_number(x: Any) -> float | None:
    """``x`` as a float if it is a number (or numeric string), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        return None
    try:
        return float(x)
    except ValueError:
        return None


def read_records(run_dir: Location | str | Path) -> RunRecords:
    """Parse ``<run_dir>/metrics.jsonl`` (missing file: empty records).

    Args:
        run_dir: the run directory.
    """
    out = RunRecords()
    by_step: dict[int, dict[str, Any]] = {}
    ppo_by_step: dict[int, dict[str, Any]] = {}
    last_time: float | None = None
    try:
        lines = read_lines(location(run_dir) / METRICS)
    except OSError:
        lines = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            out.corrupt_lines += 1
            continue
        if not isinstance(rec, dict):
            out.corrupt_lines += 1
            continue
        kind = rec.get("kind", "step")
        if as_number(rec.get("time")) is not None:
            last_time = float(rec["time"])
        elif last_time is not None:
            rec["time"] = last_time  # checkpoint records follow their step's record
        if kind == "step" and as_number(rec.get("step")) is not None:
            by_step[int(rec["step"])] = rec
        elif kind == "checkpoint":
            out.checkpoints.append(rec)
        elif kind == "resume":
            out.resumes.append(rec)
        elif kind == "ppo" and as_number(rec.get("step")) is not None:
            ppo_by_step[int(rec["step"])] = rec
    out.steps = [by_step[k] for k in sorted(by_step)]
    out.ppo = [ppo_by_step[k] for k in sorted(ppo_by_step)]
    return out


def read_budget(run_dir: Location | str | Path) -> dict[str, float]:
    """``max_steps`` / ``max_tokens`` from the run's resolved spec (empty if unknown).

    Args:
        run_dir: the run directory.
    """
    try:
        spec = yaml.safe_load((location(run_dir) / "spec.resolved.yaml").read_text()) or {}
        train = spec.get("train") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return {k: float(train[k]) for k in ("max_steps", "max_tokens") if as_number(train.get(k))}


def _run_name(run_dir: Location) -> str:
    """The spec's ``name`` (the ``run`` label of its metrics), else the directory name."""
    try:
        name = (yaml.safe_load((run_dir / "spec.resolved.yaml").read_text()) or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name) if name else run_dir.name


@dataclass
class RunStatus:
    """What ``crucible monitor`` shows."""

    run: str
    step: int = 0
    total_steps: float | None = None
    tokens: float = 0.0
    total_tokens: float | None = None
    progress: float | None = None  # 0-1
    tokens_per_s: float | None = None
    mfu: float | None = None
    loss: float | None = None
    heldout_loss: float | None = None
    eta_s: float | None = None
    last_update: float | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_time: float | None = None
    restarts: int = 0
    ledger: LedgerSummary | None = None
    gpu_hours_projected: float | None = None
    alerts: list[dict[str, Any]] | None = None  # None: Prometheus not reachable
    stragglers: list[tuple[int, float]] | None = None  # (rank, slowdown); None: not asked
    corrupt_lines: int = 0


def _last(steps: list[dict[str, Any]], key: str) -> float | None:
    for rec in reversed(steps):
        v = as_number(rec.get(key))
        if v is not None:
            return v
    return None


# The ranks the straggler check reports now, with their slowdown (see
# jobs/train/callbacks/straggler.py): one series per straggling rank.
STRAGGLERS = (
    'crucible_train_rank_slowdown_ratio{{run="{run}"}} '
    'and on (run, rank) (crucible_train_straggler{{run="{run}"}} == 1)'
)


def parse_stragglers(vector: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(rank, slowdown ratio) of each series of a :data:`STRAGGLERS` query, slowest first.

    Args:
        vector: the instant query's result.
    """
    out = []
    for series in vector:
        rank, ratio = series.get("metric", {}).get("rank"), as_number(series["value"][1])
        if rank is not None and str(rank).isdigit() and ratio is not None:
            out.append((int(rank), ratio))
    return sorted(out, key=lambda x: -x[1])


def run_status(
    run_dir: Location | str | Path,
    prometheus_url: str | None = None,
    window: int = 20,
    now: float | None = None,
) -> RunStatus:
    """Collect a run's status from its files (and Prometheus's alerts if given).

    Args:
        run_dir: the run directory.
        prometheus_url: ask this Prometheus for the run's alerts (and MFU if the records
            carry none); None: files only.
        window: recent steps averaged for tokens/s and the ETA.
        now: current time (for tests).
    """
    run_dir = location(run_dir)
    recs = read_records(run_dir)
    st = RunStatus(run=_run_name(run_dir), corrupt_lines=recs.corrupt_lines)
    budget = read_budget(run_dir)
    st.total_steps, st.total_tokens = budget.get("max_steps"), budget.get("max_tokens")
    steps = recs.steps
    if steps:
        st.step = int(steps[-1]["step"])
        st.tokens = sum(as_number(r.get("tokens")) or 0.0 for r in steps)
        recent = steps[-window:]
        secs = sum(as_number(r.get("step_seconds")) or 0.0 for r in recent)
        toks = sum(as_number(r.get("tokens")) or 0.0 for r in recent)
        st.tokens_per_s = toks / secs if secs > 0 else None
        st.loss = _last(steps, "loss")
        st.heldout_loss = _last(steps, "heldout_loss")
        st.mfu = _last(recent, "mfu")
        st.last_update = _last(steps, "time")
        per_step = secs / len(recent) if secs > 0 else None
        fractions = []
        if st.total_steps:
            fractions.append(st.step / st.total_steps)
        if st.total_tokens:
            fractions.append(st.tokens / st.total_tokens)
        if fractions:
            st.progress = min(1.0, max(fractions))
        if per_step and st.progress is not None and st.progress > 0:
            remaining_steps = st.step * (1 / st.progress - 1)
            st.eta_s = remaining_steps * per_step
    if recs.checkpoints:
        st.last_checkpoint_step = int(as_number(recs.checkpoints[-1].get("step")) or 0)
        st.last_checkpoint_time = as_number(recs.checkpoints[-1].get("time"))
    st.restarts = len(recs.resumes)
    ledger = account(run_dir, now=now)
    if ledger.attempts:
        st.ledger = ledger
        st.restarts = max(st.restarts, ledger.attempts - 1)
        if st.progress:
            st.gpu_hours_projected = ledger.gpu_hours / st.progress
    if prometheus_url:
        from crucible.monitoring.prometheus import firing_alerts, query

        st.alerts = firing_alerts(prometheus_url, st.run)
        slow = query(prometheus_url, STRAGGLERS.format(run=st.run))
        st.stragglers = None if slow is None else parse_stragglers(slow)
        if st.mfu is None and st.alerts is not None:
            res = query(prometheus_url, f'run:crucible_train_mfu:ratio_rate1m{{run="{st.run}"}}')
            if res:
                v = as_number(res[0]["value"][1])
                st.mfu = v if v is not None and math.isfinite(v) else None
    return st


def fmt_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s``, ``12s``; ``–`` for unknown.

    Args:
        seconds: a duration.
    """
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = round(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def age(t: float | None, now: float | None = None) -> str:
    """How long ago ``t`` was, formatted.

    Args:
        t: a unix time.
        now: current time.
    """
    return "–" if t is None else fmt_duration((now or time.time()) - t) + " ago"
