"""The ``cluster`` section of a spec: where a job runs and where its files live."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from crucible.config import StrictModel


class ClusterSpec(StrictModel):
    """Where a job runs."""

    address: str = Field(
        "local",
        description="'local' for the embedded cluster, or a Ray dashboard URL "
        "(http://host:8265) of a remote cluster.",
    )
    state_dir: Path | None = Field(
        None,
        description="State directory of the local cluster (default: $CRUCIBLE_HOME/cluster "
        "or ~/.crucible/cluster).",
    )
    token_path: Path | None = Field(
        None,
        description="File holding the Ray auth token of a remote cluster (local: taken "
        "from the state directory).",
    )
    storage: str = Field(
        "runs",
        description="Root of run directories (a local/NFS path); each run writes "
        "<storage>/<name>/.",
    )
