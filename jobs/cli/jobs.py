"""``crucible jobs list|status|logs|stop``: crucible's jobs on a cluster, over the Jobs API."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from crucible.cluster.spec import ClusterSpec
from crucible.jobs.client import JobsClient

app = typer.Typer(help="List, inspect, follow and stop jobs on the cluster.", no_args_is_help=True)
console = Console()

Address = typer.Option(
    "local", "--address", help="'local' or a Ray dashboard URL of a remote cluster."
)


def _client(address: str) -> JobsClient:
    return JobsClient.for_cluster(ClusterSpec(address=address))


@app.command("list")
def list_(
    address: str = Address,
    all_: bool = typer.Option(False, "--all", help="Also jobs not submitted by crucible."),
) -> None:
    """Jobs on the cluster, newest first."""
    jobs = sorted(_client(address).list(), key=lambda j: j.start_time or 0, reverse=True)
    table = Table("job", "run", "kind", "status", "started", "duration")
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
    console.print(table)


@app.command("status")
def status(job: str = typer.Argument(..., help="Submission id."), address: str = Address) -> None:
    """Status and message of one job."""
    info = _client(address).info(job)
    console.print(f"{job}: {getattr(info.status, 'value', info.status)}")
    if info.message:
        console.print(info.message)


@app.command("logs")
def logs(
    job: str = typer.Argument(..., help="Submission id."),
    address: str = Address,
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
) -> None:
    """The job's driver log."""
    client = _client(address)
    if follow_:
        from crucible.jobs.submit import follow

        raise typer.Exit(follow(client, job))
    typer.echo(client.logs(job), nl=False)


@app.command("stop")
def stop(job: str = typer.Argument(..., help="Submission id."), address: str = Address) -> None:
    """Ask the cluster to stop a job."""
    stopped = _client(address).stop(job)
    console.print(f"{job}: {'stop requested' if stopped else 'already finished'}")
