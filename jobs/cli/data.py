"""``crucible data run|stats|inspect|trace``: the data job and what it produced."""

from __future__ import annotations

from pathlib import Path

import typer

from crucible.errors import CrucibleError
from crucible.jobs.spec import load_spec

app = typer.Typer(help="Raw web text to clean documents and training shards.", no_args_is_help=True)

SetOption = typer.Option([], "--set", help="Override a spec value: key.path=value (repeatable).")


@app.command("run")
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A spec with kind: data."),
    set_: list[str] = SetOption,
    local: bool = typer.Option(
        False, "--local", help="Run in this process (no cluster), for debugging."
    ),
    detach: bool = typer.Option(False, "--detach", help="Submit and return without following."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Keep Ray Data's INFO logging and progress bars (quiet by default).",
    ),
) -> None:
    """Run the data job of SPEC: on the cluster as a Ray job, or in-process with --local."""
    from crucible.jobs.preflight import preflight
    from crucible.jobs.runs import absolutize, prepare_run

    spec = absolutize(load_spec(spec_path, set_))
    if spec.kind != "data":
        raise CrucibleError(
            f"{spec_path} has kind: {spec.kind}; `crucible data run` needs kind: data"
        )
    if local:
        from crucible.data_pipeline.pipeline import run_pipeline
        from crucible.data_pipeline.stats_report import format_stats

        assert spec.data is not None
        preflight(spec)
        d = prepare_run(spec)
        run_pipeline(spec.data, d, executor="local", verbose=verbose)
        typer.echo(format_stats(d))
        typer.echo(f"run directory: {d}")
        return
    from crucible.jobs.cli.options import follow_submitted
    from crucible.jobs.submit import submit_run

    client, job_id, d = submit_run(spec, verbose=verbose)
    follow_submitted(client, job_id, spec.name, d, detach)


@app.command("stats")
def stats(
    run: str = typer.Argument(
        ..., help="A data run: its name (under --storage) or its directory (path or URI)."
    ),
    storage: str | None = typer.Option(None, help="Storage root the run name is under."),
) -> None:
    """Documents and bytes per step, drops per rule, duplicate clusters, languages."""
    from crucible.data_pipeline.stats_report import format_stats
    from crucible.jobs.runs import find_run

    typer.echo(format_stats(find_run(run, storage)))


@app.command("inspect")
def inspect(
    shards: str = typer.Argument(
        ..., help="A training shard directory (with manifest.json): a path or URI."
    ),
) -> None:
    """Totals, a decoded sample and the checksum status of a shard set."""
    from crucible.data_pipeline.shards.inspect import inspect_shards

    typer.echo(inspect_shards(shards))


@app.command("trace")
def trace(
    shards: str = typer.Argument(..., help="A training shard directory: a path or URI."),
    index: int = typer.Argument(..., help="Sample index (row of the split)."),
    split: str = typer.Option("train", help="train or heldout."),
) -> None:
    """The ids of the documents a training sample was packed from."""
    from crucible.data_pipeline.shards.inspect import format_trace

    typer.echo(format_trace(shards, index, split))
