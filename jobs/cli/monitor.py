"""``crucible monitor RUN`` (live terminal view) and ``crucible report RUN`` (PNGs + Markdown).

Both read the run's own files, so they work without Grafana and after the job has ended;
``monitor`` adds Prometheus's alerts when the local cluster's Prometheus answers.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from crucible.jobs.cli.options import Address, StateDir, TokenPath, cluster_spec, prometheus_url
from crucible.jobs.runs import find_run
from crucible.monitoring.report import write_report
from crucible.monitoring.status import RunStatus, age, fmt_duration, run_status


def render(st: RunStatus) -> Panel:
    """One frame of the monitor.

    Args:
        st: from :func:`crucible.monitoring.status.run_status`.
    """

    def f(x: float | None, spec: str, scale: float = 1.0) -> str:
        return "–" if x is None else format(x * scale, spec)

    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    budget = (
        f"step {st.step:,}" + (f" / {st.total_steps:,.0f}" if st.total_steps else "")
        + f"   tokens {st.tokens:,.0f}" + (f" / {st.total_tokens:,.0f}" if st.total_tokens else "")
    )  # fmt: skip
    t.add_row("progress", budget)
    if st.progress is not None:
        t.add_row(
            "", Group(ProgressBar(total=1.0, completed=st.progress, width=40),
                      Text(f"{st.progress:.1%}  ETA {fmt_duration(st.eta_s)}"))
        )  # fmt: skip
    t.add_row("tokens/s", f(st.tokens_per_s, ",.0f"))
    t.add_row("MFU", f(st.mfu, ".1f", 100) + (" %" if st.mfu is not None else ""))
    t.add_row("loss", f(st.loss, ".4f") + f"   held-out {f(st.heldout_loss, '.4f')}")
    led = st.ledger
    if led is not None:
        t.add_row(
            "GPU-hours",
            f"{led.gpu_hours:.3f} used, projected {f(st.gpu_hours_projected, '.3f')}   "
            f"goodput {led.goodput:.1%}   lost {led.seconds['lost'] / 3600:.3f}",
        )
    else:
        t.add_row("GPU-hours", "– (no ledger yet)")
    ckpt = (
        "none yet" if st.last_checkpoint_step is None
        else f"step {st.last_checkpoint_step}, {age(st.last_checkpoint_time)}"
    )  # fmt: skip
    t.add_row("checkpoint", ckpt)
    t.add_row("restarts", str(st.restarts))
    t.add_row("last step", age(st.last_update))
    if st.stragglers:
        t.add_row("stragglers", Text(", ".join(
            f"rank {r} ({ratio:.2f}x the others' busy time)" for r, ratio in st.stragglers
        ), style="yellow"))  # fmt: skip
    if st.alerts is None:
        t.add_row("alerts", Text("Prometheus not reachable", style="dim"))
    elif not st.alerts:
        t.add_row("alerts", Text("none", style="green"))
    else:
        lines = [
            Text(
                f"{a.get('state', '?')}: {a['labels'].get('alertname', '?')} "
                f"{a.get('annotations', {}).get('summary', '')}",
                style="red" if a.get("state") == "firing" else "yellow",
            )
            for a in st.alerts
        ]
        t.add_row("alerts", Group(*lines))
    return Panel(t, title=f"crucible monitor · {st.run}", expand=False)


def monitor_cmd(
    run: str = typer.Argument(..., help="Run directory or run name."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    interval: float = typer.Option(2.0, help="Seconds between refreshes."),
    prometheus: str | None = typer.Option(
        None,
        help="Prometheus URL (default: the local cluster's; for a remote one $RAY_PROMETHEUS_HOST).",
    ),
    storage: str | None = typer.Option(None, help="Where run names are looked up."),
    address: str | None = Address,
    state_dir: Path | None = StateDir,
    token_path: Path | None = TokenPath,
) -> None:
    """Live view of a training run: progress, tokens/s, MFU, loss, GPU-hours, alerts."""
    run_dir = find_run(run, storage)
    url = prometheus_url(cluster_spec(address, state_dir, token_path), prometheus)
    console = Console()
    if once:
        console.print(render(run_status(run_dir, url)))
        return
    with Live(render(run_status(run_dir, url)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(run_status(run_dir, url)), refresh=True)
        except KeyboardInterrupt:
            pass


def report_cmd(
    run: str = typer.Argument(..., help="Run directory or run name."),
    price: float | None = typer.Option(None, help="$ per GPU-hour, for the cost line."),
    storage: str | None = typer.Option(None, help="Where run names are looked up."),
) -> None:
    """Write loss/throughput/MFU/GPU-hours charts and report.md into <run>/report/."""
    run_dir = find_run(run, storage)
    files = write_report(run_dir, price)
    for f in files:
        typer.echo(str(f))
