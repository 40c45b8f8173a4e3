"""``crucible report``: PNG charts and a Markdown summary of a run, for sharing.

Charts (matplotlib, headless): loss (train and held-out) by step, throughput (tokens/s) by
step with restarts marked, MFU by step where the records carry it, a PPO run's score and KL by
PPO step, and cumulative GPU-hours
by phase over time from the ledger; ``report.md`` adds goodput with badput by cause and the
paused time (not billed). Written to ``<run_dir>/report/``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt

from crucible.cluster.storage import Location, location
from crucible.monitoring.ledger import PHASES, LedgerSummary
from crucible.monitoring.status import (
    RunStatus,
    as_number,
    fmt_duration,
    read_records,
    run_status,
)

PHASE_COLORS = {
    "productive": "#2ca02c", "lost": "#d62728", "uncommitted": "#ff9896",
    "checkpoint": "#1f77b4", "data_wait": "#9467bd", "eval": "#17becf",
    "startup": "#ff7f0e", "idle": "#7f7f7f",
}  # fmt: skip


def _series(steps: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in steps:
        v = as_number(r.get(key))
        if v is not None:
            xs.append(int(r["step"]))
            ys.append(v)
    return xs, ys


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    run_dir: Location | str | Path, price_per_device_hour: float | None = None
) -> list[Location]:
    """Write the charts and ``report.md`` into ``<run_dir>/report/``; return the files.

    Args:
        run_dir: the run directory (path or URI).
        price_per_device_hour: $ per GPU-hour for the cost line (omitted if None).
    """
    run_dir = location(run_dir)
    with tempfile.TemporaryDirectory(prefix="crucible-report-") as tmp:
        written = []
        for f in _write_local(run_dir, Path(tmp), price_per_device_hour):
            dest = run_dir / "report" / f.name
            dest.upload(f)
            written.append(dest)
    return written


def _write_local(run_dir: Location, out: Path, price_per_device_hour: float | None) -> list[Path]:
    recs = read_records(run_dir)
    st = run_status(run_dir)
    files: list[Path] = []
    steps = recs.steps
    restarts = [int(as_number(r.get("step")) or 0) for r in recs.resumes]

    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*_series(steps, "loss"), label="train", lw=1.2)
        hx, hy = _series(steps, "heldout_loss")
        if hx:
            ax.plot(hx, hy, "o-", label="held-out", ms=3)
        ax.set(xlabel="step", ylabel="loss", title=f"{st.run}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        files.append(_save(fig, out / "loss.png"))

        fig, ax = plt.subplots(figsize=(7, 4))
        xs, secs = _series(steps, "step_seconds")
        toks = {int(r["step"]): as_number(r.get("tokens")) or 0.0 for r in steps}
        ax.plot(xs, [toks[x] / s if s > 0 else 0 for x, s in zip(xs, secs, strict=True)], lw=1)
        for i, s in enumerate(restarts):
            ax.axvline(s, color="red", ls="--", lw=1, label="restart" if i == 0 else None)
        ax.set(xlabel="step", ylabel="tokens / s", title=f"{st.run}: throughput")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if restarts:
            ax.legend()
        files.append(_save(fig, out / "throughput.png"))

        mx, my = _series(steps, "mfu")
        if mx:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(mx, [100 * v for v in my], lw=1)
            ax.set(xlabel="step", ylabel="MFU (%)", title=f"{st.run}: model FLOPs utilisation")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            files.append(_save(fig, out / "mfu.png"))

    if recs.ppo:
        files.append(_ppo_chart(recs.ppo, restarts, st.run, out / "ppo.png"))

    if st.ledger is not None and st.ledger.timeline:
        fig, ax = plt.subplots(figsize=(7, 4))
        # From the first attempt's start: phases are added when their interval ends, so
        # the first start-up shows as a rise after it, not at the origin.
        t0 = min(st.ledger.start_time or math.inf, st.ledger.timeline[0][0] - 1e-9)
        totals = dict.fromkeys(PHASES, 0.0)
        ts: list[float] = [0.0]
        stacks: dict[str, list[float]] = {p: [0.0] for p in PHASES}
        for t, phase, secs_ in st.ledger.timeline:
            totals[phase] += secs_ / 3600
            ts.append((t - t0) / 3600)
            for p in PHASES:
                stacks[p].append(totals[p])
        used = [p for p in PHASES if totals[p] > 0]
        # Linear between points: each interval's device-time accrues over the span that
        # ends at its point (intervals are contiguous), so the total climbs at devices/s.
        ax.stackplot(ts, [stacks[p] for p in used], labels=used,
                     colors=[PHASE_COLORS[p] for p in used])  # fmt: skip
        ax.set(xlabel="wall time (h)", ylabel="device-hours (cumulative)",
               title=f"{st.run}: GPU-hours by phase")  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        files.append(_save(fig, out / "gpu_hours.png"))

    md = out / "report.md"
    md.write_text(_markdown(st, [f.name for f in files], price_per_device_hour, recs.ppo))
    files.append(md)
    return files


def _ppo_chart(steps: list[dict], restarts: list[int], run: str, path: Path) -> Path:
    """A PPO run's reward-model score (mean ± std of the sampled answers) and KL to the
    reference per answer, by PPO step."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    xs, mean = _series(steps, "score_mean")
    _, std = _series(steps, "score_std")
    top.plot(xs, mean, lw=1.2, label="score (mean)")
    top.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                     [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2, label="± std")  # fmt: skip
    top.set(ylabel="reward-model score", title=f"{run}: PPO")
    top.legend(fontsize=8)
    bottom.plot(*_series(steps, "kl"), lw=1.2, color="#d62728", label="KL to the reference")
    bottom.set(xlabel="PPO step", ylabel="KL per answer (nats)")
    for ax in (top, bottom):
        for i, s in enumerate(restarts):
            ax.axvline(
                s, color="gray", ls="--", lw=1, label="restart" if i == 0 and ax is top else None
            )
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _markdown(
    st: RunStatus, images: list[str], price: float | None, ppo: list[dict] | None = None
) -> str:
    def f(x: float | None, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    if ppo:  # a PPO run: its steps are PPO steps
        a, b = ppo[0], ppo[-1]
        rows = [
            ("PPO steps", str(b["step"])),
            ("score (mean, first → last step)", f"{a['score_mean']:.4f} → {b['score_mean']:.4f}"),
            ("KL per answer (last step)", f"{b['kl']:.4f}"),
            ("last checkpoint", "–" if st.last_checkpoint_step is None
             else f"step {st.last_checkpoint_step}"),
            ("restarts", str(st.restarts)),
        ]  # fmt: skip
    else:
        rows = _train_rows(st, f)
    return _markdown_body(st, rows, images, price)


def _train_rows(st: RunStatus, f: Any) -> list[tuple[str, str]]:
    return [
        ("steps", f"{st.step}" + (f" / {st.total_steps:.0f}" if st.total_steps else "")),
        ("tokens", f"{st.tokens:,.0f}" + (f" / {st.total_tokens:,.0f}" if st.total_tokens else "")),
        ("progress", f(None if st.progress is None else 100 * st.progress, ".1f") + " %"),
        ("loss (last)", f(st.loss, ".4f")),
        ("held-out loss (last)", f(st.heldout_loss, ".4f")),
        ("tokens/s (recent)", f(st.tokens_per_s, ",.0f")),
        ("MFU (recent)", f(None if st.mfu is None else 100 * st.mfu, ".1f") + " %"),
        ("last checkpoint", "–" if st.last_checkpoint_step is None
         else f"step {st.last_checkpoint_step}"),
        ("restarts", str(st.restarts)),
    ]  # fmt: skip


def _markdown_body(
    st: RunStatus, rows: list[tuple[str, str]], images: list[str], price: float | None
) -> str:
    lines = [f"# Run `{st.run}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    led = st.ledger
    if led is not None:
        lines += ["", "## GPU-hours", "", "| phase | device-hours | share |", "|---|---:|---:|"]
        for phase, secs in led.seconds.items():
            if secs > 0:
                lines.append(f"| {phase} | {secs / 3600:.4f} | {secs / led.total_seconds:.1%} |")
        lines.append(f"| **total** | **{led.gpu_hours:.4f}** | |")
        lines += [
            "",
            f"Goodput {led.goodput:.1%} (productive ÷ all device time) over {led.attempts} "
            f"attempt(s), {led.devices} device(s), wall time {fmt_duration(led.wall_seconds)}.",
        ]
        lines += _causes(led)
        if price is not None:
            lines.append(f"Cost at ${price:g}/GPU-hour: ${led.gpu_hours * price:,.2f}.")
        if led.corrupt_lines:
            lines.append(f"{led.corrupt_lines} unreadable ledger line(s) skipped.")
    if st.corrupt_lines:
        lines.append(f"{st.corrupt_lines} unreadable metrics line(s) skipped.")
    lines += ["", *[f"![{Path(i).stem}]({i})" for i in images]]
    return "\n".join(lines) + "\n"


CAUSE_NAMES = {
    "productive": "productive (goodput)", "startup": "start-up", "restart": "restart",
    "hang": "hang", "checkpoint_load": "checkpoint load", "checkpoint_save": "checkpoint save",
    "lost": "lost (rolled back)", "rollback": "loss-spike rollback", "data_wait": "data wait",
    "eval": "evaluation", "idle": "idle", "preemption": "preemption (SIGTERM)",
    "uncommitted": "uncommitted (not yet known)",
}  # fmt: skip


def _causes(led: LedgerSummary) -> list[str]:
    """Goodput and every badput cause (zeros too), then the paused time nobody is billed."""
    total = led.total_seconds
    lines = ["", "## Goodput and badput", "",
             "| cause | device-hours | share |", "|---|---:|---:|"]  # fmt: skip
    for cause, name in CAUSE_NAMES.items():
        secs = led.causes.get(cause, 0.0)
        share = f"{secs / total:.1%}" if total > 0 else "–"
        lines.append(f"| {name} | {secs / 3600:.4f} | {share} |")
    paused = f"Paused {fmt_duration(led.paused_seconds)} over {led.pauses} pause(s)"
    lines += ["", f"{paused}, queued {fmt_duration(led.queued_seconds)}: wall time between "
              "a stop and the resumed job's start, billed to no phase."]  # fmt: skip
    return lines
