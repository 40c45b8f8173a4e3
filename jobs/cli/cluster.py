"""``crucible cluster up|down|status``: the local embedded cluster."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from crucible.cluster import local
from crucible.monitoring.prometheus import rule_files

app = typer.Typer(help="Start, stop and inspect the local embedded cluster.", no_args_is_help=True)
console = Console()

StateDir = typer.Option(
    None,
    "--state-dir",
    help="Cluster state directory (default: $CRUCIBLE_HOME/cluster or ~/.crucible/cluster).",
)


@app.command("up")
def up(
    local_: bool = typer.Option(
        True, "--local", help="The local embedded cluster (the default, and the only kind)."
    ),
    state_dir: Path | None = StateDir,
    num_cpus: int | None = typer.Option(None, help="CPUs Ray may use (default: all)."),
    gcs_port: int = typer.Option(local.Ports.gcs, help="Ray GCS port."),
    dashboard_port: int = typer.Option(local.Ports.dashboard, help="Ray dashboard / Jobs API."),
    client_server_port: int = typer.Option(local.Ports.client_server, help="Ray client port."),
    metrics_export_port: int = typer.Option(local.Ports.metrics_export, help="Ray metrics."),
    dashboard_agent_port: int = typer.Option(local.Ports.dashboard_agent, help="Ray agent."),
    prometheus_port: int = typer.Option(local.Ports.prometheus, help="Prometheus web/API."),
    metrics_discovery_port: int = typer.Option(
        local.Ports.metrics_discovery, help="crucible's scrape-target registry (HTTP SD)."
    ),
    prometheus_bin: str | None = typer.Option(None, help="Path of the prometheus binary."),
) -> None:
    """Start a token-authenticated Ray head and a Prometheus on 127.0.0.1."""
    ports = local.Ports(
        gcs=gcs_port,
        dashboard=dashboard_port,
        client_server=client_server_port,
        metrics_export=metrics_export_port,
        dashboard_agent=dashboard_agent_port,
        prometheus=prometheus_port,
        metrics_discovery=metrics_discovery_port,
    )
    t0 = time.monotonic()
    with console.status("starting Ray head and Prometheus ..."):
        state, started = local.up(
            state_dir, ports, num_cpus, prometheus_bin, rule_files=rule_files()
        )
    if not started:
        console.print(
            f"a local cluster is already running in {state.state_dir} "
            f"(dashboard {state.dashboard_url}); nothing changed"
        )
        return
    console.print(f"[green]local cluster up[/] in {time.monotonic() - t0:.0f}s")
    _print_addresses(state)


def _print_addresses(state: local.ClusterState) -> None:
    console.print(f"  Ray dashboard / Jobs API  {state.dashboard_url}")
    console.print(f"  Prometheus                {state.prometheus_url}")
    console.print(f"  auth token file (0600)    {state.token_path}")
    console.print(f"  state directory           {state.state_dir}")
    console.print(f"  Ray temp dir (its logs)   {state.ray_temp_dir}")


@app.command("down")
def down(state_dir: Path | None = StateDir) -> None:
    """Stop exactly the processes `cluster up` started."""
    state, n = local.down(state_dir)
    if state is None or n == 0:
        console.print("no local cluster is running; nothing to stop")
        return
    console.print(f"local cluster stopped ({n} process groups)")


@app.command("status")
def status(state_dir: Path | None = StateDir) -> None:
    """Addresses, health, scrape targets and running jobs of the local cluster."""
    info = local.status(state_dir)
    if not info["running"]:
        console.print(f"no local cluster is running (state dir {info['state_dir']})")
        raise typer.Exit(1)
    table = Table(show_header=False, box=None)
    table.add_row("state dir", info["state_dir"])
    table.add_row(
        "up since", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
    )
    for name, pid in info["processes"].items():
        table.add_row(name, f"pid {pid}" if pid else "[red]not running[/]")
    table.add_row("dashboard / Jobs API", info["dashboard"])
    table.add_row("ray address", info["ray_address"])
    table.add_row("prometheus", info["prometheus"])
    table.add_row("ray temp dir (logs)", info["ray_temp_dir"])
    ray = info.get("ray", {})
    if ray:
        table.add_row("ray health", "[green]ok[/]" if ray.get("healthy") else "[red]down[/]")
        if "nodes" in ray:
            table.add_row("ray nodes", str(ray["nodes"]))
    for t in info.get("targets", []):
        colour = "green" if t["health"] == "up" else "red"
        table.add_row(f"target {t['job']}", f"{t['instance']} [{colour}]{t['health']}[/]")
    jobs = ray.get("jobs", [])
    table.add_row("running jobs", str(len(jobs)) if jobs else "none")
    for j in jobs:
        table.add_row(f"  {j['id']}", f"{j['status']}  {j['entrypoint']}")
    console.print(table)
