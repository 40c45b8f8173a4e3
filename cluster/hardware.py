"""The hardware catalogue: what one accelerator and its node can do, for the planner.

Figures are vendor datasheet numbers (dense bf16 tensor-core peak, HBM size and bandwidth,
NVLink bandwidth per GPU, NICs per node, board power) as collected in ANCHORS.md. Prices are
*assumptions*, not quotes: roughly the on-demand list price per GPU-hour of GPU clouds in
2024; set ``cluster.usd_per_gpu_hour`` to what you pay.

The ``cpu`` entry is for local runs: its peak FLOP/s is *measured* on this machine (a short
fp32 matmul benchmark through torch), cached per CPU model, thread count and torch version.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

from crucible.cluster.storage.files import write_json_file
from crucible.errors import CrucibleError


@dataclass(frozen=True)
class Accelerator:
    """One device type and the node it usually comes in."""

    name: str
    peak_flops: float  # dense bf16 (GPUs) or measured fp32 (cpu) FLOP/s per device
    memory_bytes: int  # device memory
    hbm_bytes_per_s: float  # device memory bandwidth
    nvlink_bytes_per_s: float  # intra-node bandwidth per device, both directions summed
    nic_bits_per_s: float  # inter-node bandwidth per device (one NIC per GPU on DGX/HGX)
    gpus_per_node: int
    watts: float  # board power (TDP) per device
    usd_per_hour: float  # assumed on-demand price per device-hour
    measured: bool = False  # peak_flops comes from a benchmark on this machine

    @property
    def intra_node_bytes_per_s(self) -> float:
        """One direction of NVLink: what a ring collective inside a node moves per GPU."""
        return self.nvlink_bytes_per_s / 2

    @property
    def inter_node_bytes_per_s(self) -> float:
        """One direction of this GPU's NIC, in bytes/s."""
        return self.nic_bits_per_s / 8


GB = 10**9
TB = 10**12

# Datasheets: NVIDIA A100 (2020, table 1), H100 SXM5 (2022), H200 (2024); DGX A100 has
# 8 × 200 Gb/s HDR InfiniBand for compute traffic, DGX H100 8 × 400 Gb/s NDR.
_CATALOGUE: dict[str, Accelerator] = {
    "a100-40gb": Accelerator(
        "a100-40gb", 312e12, 40 * GB, 1.555 * TB, 600 * GB, 200e9, 8, 400, 1.29
    ),
    "a100-80gb": Accelerator(
        "a100-80gb", 312e12, 80 * GB, 2.039 * TB, 600 * GB, 200e9, 8, 400, 1.79
    ),
    "h100-sxm": Accelerator("h100-sxm", 989e12, 80 * GB, 3.35 * TB, 900 * GB, 400e9, 8, 700, 2.99),
    "h200": Accelerator("h200", 989e12, 141 * GB, 4.8 * TB, 900 * GB, 400e9, 8, 700, 3.79),
}
GPU_NAMES = (*_CATALOGUE, "cpu")


@dataclass(frozen=True)
class Fabric:
    """How one GPU type's nodes talk to each other, and what NCCL needs to use it."""

    name: str  # "efa" (AWS) or "infiniband"
    nccl_env: dict[str, str]  # set in every Ray node's environment
    aws_instance: str | None = None  # the instance type of 8 such GPUs (launcher, AWS)
    efa_interfaces: int = 0  # EFA network cards of that instance type


# NCCL's bootstrap and its TCP fallback skip loopback and the container bridge.
_SOCKETS = {"NCCL_SOCKET_IFNAME": "^lo,docker0", "NCCL_DEBUG": "WARN"}
# EFA through NCCL's libfabric plugin (aws-ofi-nccl, in AWS's Deep Learning AMIs and images):
# GPUDirect RDMA on the EFA devices, and fork-safety for Ray's forked workers.
_EFA = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1", **_SOCKETS}
# InfiniBand verbs on the node's Mellanox HCAs (DGX/HGX: one 200/400 Gb/s HCA per GPU).
_IB = {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5", **_SOCKETS}
# AWS EC2 user guide, "EFA configuration for P5 and P5e instances" and instance specs:
# p4d/p4de 4 EFA network cards (400 Gb/s), p5 32 (3200 Gb/s), p5en 16 EFAv3 (3200 Gb/s).
FABRICS: dict[str, dict[str, Fabric]] = {
    "efa": {
        "a100-40gb": Fabric("efa", _EFA, "p4d.24xlarge", 4),
        "a100-80gb": Fabric("efa", _EFA, "p4de.24xlarge", 4),
        "h100-sxm": Fabric("efa", _EFA, "p5.48xlarge", 32),
        "h200": Fabric("efa", _EFA, "p5en.48xlarge", 16),
    },
    "infiniband": {name: Fabric("infiniband", _IB) for name in _CATALOGUE},
}


def get_fabric(kind: str, gpu: str) -> Fabric:
    """The fabric ``kind`` (``efa`` or ``infiniband``) for nodes of ``gpu``.

    Args:
        kind: ``efa`` (AWS) or ``infiniband``.
        gpu: a GPU name of the catalogue.

    Raises:
        CrucibleError: an unknown fabric, or no such node for that GPU.
    """
    if kind not in FABRICS:
        raise CrucibleError(f"fabric {kind!r} is unknown; use one of {', '.join(FABRICS)}")
    if gpu not in FABRICS[kind]:
        raise CrucibleError(
            f"no {kind} node is known for cluster.gpu {gpu!r}; use one of "
            f"{', '.join(FABRICS[kind])}"
        )
    return FABRICS[kind][gpu]


def get_accelerator(name: str, field: str = "cluster.gpu") -> Accelerator:
    """The catalogue entry for ``name`` (``cpu`` is measured on first use).

    Args:
        name: one of :data:`GPU_NAMES`.
        field: the spec field the name came from, for the error message.

    Raises:
        CrucibleError: ``name`` is not in the catalogue.
    """
    if name == "cpu":
        return cpu_accelerator()
    if name not in _CATALOGUE:
        close = difflib.get_close_matches(name, GPU_NAMES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CrucibleError(
            f"{field} = {name!r} is not a known accelerator; {hint}use one of "
            f"{', '.join(GPU_NAMES)}"
        )
    return _CATALOGUE[name]


def _cache_path() -> Path:
    home = os.environ.get("CRUCIBLE_HOME")
    return (Path(home) if home else Path.home() / ".crucible") / "cpu_peak.json"


def _cpu_key() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def measure_cpu_flops(size: int = 1024, seconds: float = 0.5) -> float:
    """Best fp32 matmul FLOP/s of this machine with torch's current thread count.

    Args:
        size: square matrix size (2·size³ FLOPs per matmul).
        seconds: how long to keep multiplying (best of the timed repetitions is kept).
    """
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool, allocator
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def cpu_accelerator(refresh: bool = False) -> Accelerator:
    """The local CPU as an accelerator: measured peak, host memory, no interconnect.

    Args:
        refresh: re-measure even if a cached figure exists.
    """
    import psutil

    path, key = _cache_path(), _cpu_key()
    cached: dict[str, float] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    if refresh or key not in cached:
        cached[key] = measure_cpu_flops()
        write_json_file(path, cached)
    return Accelerator(
        name="cpu",
        peak_flops=cached[key],
        memory_bytes=psutil.virtual_memory().total,
        hbm_bytes_per_s=0.0,
        nvlink_bytes_per_s=0.0,
        nic_bits_per_s=0.0,
        gpus_per_node=1,
        watts=0.0,
        usd_per_hour=0.0,
        measured=True,
    )


def with_overrides(
    acc: Accelerator,
    *,
    usd_per_hour: float | None = None,
    watts: float | None = None,
    nic_gbps: float | None = None,
    nvlink_gb_per_s: float | None = None,
    gpus_per_node: int | None = None,
) -> Accelerator:
    """``acc`` with the cluster spec's overrides applied (None keeps the catalogue value).

    Args:
        acc: the catalogue entry.
        usd_per_hour: price per device-hour.
        watts: power per device.
        nic_gbps: inter-node Gb/s per device.
        nvlink_gb_per_s: intra-node GB/s per device (both directions).
        gpus_per_node: devices per node.
    """
    changes: dict[str, float | int] = {}
    if usd_per_hour is not None:
        changes["usd_per_hour"] = usd_per_hour
    if watts is not None:
        changes["watts"] = watts
    if nic_gbps is not None:
        changes["nic_bits_per_s"] = nic_gbps * 1e9
    if nvlink_gb_per_s is not None:
        changes["nvlink_bytes_per_s"] = nvlink_gb_per_s * GB
    if gpus_per_node is not None:
        changes["gpus_per_node"] = gpus_per_node
    return replace(acc, **changes)  # type: ignore[arg-type]
