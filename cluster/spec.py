"""The ``cluster`` section of a spec: where a job runs and where its files live."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

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
        description="Root of run directories: a path every node shares (NFS), or an object "
        "store URI (s3://bucket/prefix; credentials from the standard AWS chain, endpoint of "
        "an S3-compatible store from $AWS_ENDPOINT_URL); each run writes <storage>/<name>/.",
    )
    gpu: str = Field(
        "cpu",
        description="Accelerator type: a100-40gb, a100-80gb, h100-sxm, h200, or cpu (local).",
    )
    nodes: int = Field(1, ge=1, description="Number of nodes (machines) in the cluster.")
    gpus_per_node: int | None = Field(
        None, ge=1, description="Accelerators per node (default: the catalogue's, 8 for GPUs)."
    )
    usd_per_gpu_hour: float | None = Field(
        None, ge=0, description="Price per GPU-hour (default: the catalogue's list-price guess)."
    )
    watts_per_gpu: float | None = Field(
        None, ge=0, description="Power per GPU in watts (default: the catalogue's board power)."
    )
    pue: float = Field(
        1.2, ge=1, description="Data-centre power usage effectiveness (facility / IT energy)."
    )
    nic_gbps_per_gpu: float | None = Field(
        None, gt=0, description="Inter-node Gb/s per GPU (default: 200 for A100, 400 for H100)."
    )
    nvlink_gb_per_s: float | None = Field(
        None, gt=0, description="Intra-node GB/s per GPU, both directions (default: NVLink)."
    )

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, v: str) -> str:
        from crucible.cluster.storage import check_uri
        from crucible.errors import CrucibleError

        try:
            check_uri(v)
        except CrucibleError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, v: str) -> str:
        from crucible.cluster.hardware import GPU_NAMES

        if v not in GPU_NAMES:
            raise ValueError(f"unknown accelerator; use one of {', '.join(GPU_NAMES)}")
        return v

    @property
    def num_gpus(self) -> int:
        """Accelerators in the whole cluster (nodes × GPUs per node)."""
        return self.nodes * (self.gpus_per_node or (1 if self.gpu == "cpu" else 8))
