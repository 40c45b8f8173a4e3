"""``crucible jobs list|status|logs|stop``: crucible's jobs on a cluster, over the Jobs API."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from crucible.jobs.cli.options import Address, StateDir, TokenPath, cluster_spec
from crucible.jobs.client import JobsClient

app = typer.Typer(help="List, inspect, follow and stop jobs on the cluster.", no_args_is_help=True)
console = Console()


def _client(address: str | None, state_dir: Path | None, token_path: Path | None) -> JobsClient:
    return JobsClient.for_cluster(cluster_spec(address, state_dir, token_path))


@app.command("list")
def list_(
    address: str | None = Address,
    state_dir: Path | None = StateDir,
    token_path: Path | None = TokenPath,
    all_: bool = typer.Option(False, "--all", help="Also jobs not submitted by crucible."),
) -> None:
    """Jobs on the cluster, newest first (full ids: `logs` and `stop` take them)."""
    client = _client(address, state_dir, token_path)
    jobs = sorted(client.list(), key=lambda j: j.start_time or 0, reverse=True)
    table = Table("job", "run", "kind", "status", "started", "duration")
    table.columns[0].no_wrap = True
    table.columns[0].overflow = "fold"  # never "…": the id is what the other verbs need
    for j in jobs:
        meta = j.metadata or {}
        if not all_ and "crucible_run" not in meta:
            continue
        start = (j.start_time or 0) / 1000
        end = (j.end_time or 0) / 1000 or time.time()
        table.add_row(
            j.submission_id or j.job_id or "?",
            meta.get("crucible_run", "-"),
            meta.get("crucible_kind", "-"),
            str(getattr(j.status, "value", j.status)),
            time.strftime("%m-%d %H:%M:%S", time.localtime(start)) if start else "-",
            f"{end - start:.0f}s" if start else "-",
        )
    Console(width=max(console.width, 160)).print(table)


@app.command("status")
def status(
    job: str = typer.Argument(..., help="Submission id."),
    address: str | None = Address,
    state_dir: Path | None = StateDir,
    token_path: Path | None = TokenPath,
) -> None:
    """Status and message of one job."""
    info = _client(address, state_dir, token_path).info(job)
    console.print(f"{job}: {getattr(info.status, 'value', info.status)}")
    if info.message:
        console.print(info.message)


@app.command("logs")
def logs(
    job: str = typer.Argument(..., help="Submission id."),
    address: str | None = Address,
    state_dir: Path | None = StateDir,
    token_path: Path | None = TokenPath,
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
) -> None:
    """The job's driver log."""
    client = _client(address, state_dir, token_path)
    if follow_:
        from crucible.jobs.submit import follow

        raise typer.Exit(follow(client, job))
    typer.echo(client.logs(job), nl=False)


@app.command("stop")
def stop(
    job: str = typer.Argument(..., help="Submission id."),
    checkpoint: bool = typer.Option(
        True, "--checkpoint/--no-checkpoint", help="Train runs: save the step they stop at."
    ),
    timeout: float = typer.Option(
        600.0, help="Seconds to wait for a train run's graceful stop before ending it at once."
    ),
    address: str | None = Address,
    state_dir: Path | None = StateDir,
    token_path: Path | None = TokenPath,
) -> None:
    """Stop a job. A train run stops gracefully: its workers finish the current step, save
    it and exit before this returns; `crucible resume` then continues from that step."""
    from crucible.jobs.stop import stop_job

    client = _client(address, state_dir, token_path)
    console.print(stop_job(client, job, checkpoint=checkpoint, timeout_s=timeout))
