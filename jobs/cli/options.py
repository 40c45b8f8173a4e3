"""The options every verb that talks to a cluster takes, the same way ``cluster up`` does."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from crucible.cluster.spec import ClusterSpec

Address = typer.Option(
    None, "--address", help="'local' or a Ray dashboard URL of a remote cluster (http://head:8265)."
)
StateDir = typer.Option(
    None,
    "--state-dir",
    help="State directory of the local cluster (default: $CRUCIBLE_HOME/cluster).",
)
TokenPath = typer.Option(
    None, "--token-path", help="File holding a remote cluster's Ray auth token."
)


def cluster_spec(
    address: str | None,
    state_dir: Path | None,
    token_path: Path | None,
    base: ClusterSpec | None = None,
) -> ClusterSpec:
    """``base`` (default: the local cluster) with the given options replacing its fields.

    Args:
        address: ``--address``.
        state_dir: ``--state-dir``.
        token_path: ``--token-path``.
        base: a spec's cluster section to start from.
    """
    data = (base or ClusterSpec()).model_dump()
    for key, value in (("address", address), ("state_dir", state_dir), ("token_path", token_path)):
        if value is not None:
            data[key] = value
    return ClusterSpec.model_validate(data)


def prometheus_url(cluster: ClusterSpec, explicit: str | None) -> str | None:
    """That cluster's Prometheus: ``explicit``; the local cluster's, from its state; or, for a
    remote cluster, ``$RAY_PROMETHEUS_HOST`` (the variable Ray's dashboard reads for it).

    Args:
        cluster: the cluster.
        explicit: ``--prometheus``.
    """
    if explicit:
        return explicit
    if cluster.address != "local":
        return os.environ.get("RAY_PROMETHEUS_HOST") or None
    from crucible.cluster.local import default_state_dir, load_state

    try:
        state = load_state((cluster.state_dir or default_state_dir()).expanduser().resolve())
    except Exception:  # an unreadable cluster state only loses the alerts line
        return None
    return state.prometheus_url if state is not None and state.alive() else None


def follow_submitted(client: object, job_id: str, name: str, run_dir: object, detach: bool) -> None:
    """Say what was submitted, then (unless ``detach``) print the job's logs until it ends;
    exit with the job's failure code."""
    from crucible.jobs.submit import follow

    typer.echo(f"submitted job {job_id} for run {name} (run directory {run_dir})")
    if detach:
        return
    rc = follow(client, job_id)  # type: ignore[arg-type]
    if rc:
        raise typer.Exit(rc)
