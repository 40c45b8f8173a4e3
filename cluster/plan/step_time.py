"""Step time of one configuration: a compute term and a ZeRO communication term.

    compute = hardware FLOPs per GPU per step / (peak × compute_efficiency)
    comm    = cross-node bytes / (NIC × network_efficiency) + NVLink bytes / (NVLink × eff.)
    step    = max(compute, comm) + (1 − overlap) × min(compute, comm) + offload transfers

A run is network-bound when comm > compute. MFU follows as model FLOPs (6N + attention, no
recomputation) over step time × peak. The constants of :class:`StepModel` are one set for
every prediction, calibrated on published A100 runs (see ``tests/cluster/test_planner_
published.py``); an assumed MFU or throughput replaces the prediction when given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crucible.cluster.plan.comm import CommVolume, zero_comm_volume
from crucible.errors import CrucibleError
from crucible.model.accounting import (
    hardware_flops_per_token,
    model_flops_per_token,
    num_params,
)

if TYPE_CHECKING:
    from crucible.cluster.hardware import Accelerator
    from crucible.model.config import ModelConfig
    from crucible.model.spec import ParallelSpec


@dataclass(frozen=True)
class StepModel:
    """The step-time model's fixed constants (one set for all plans; see module docstring).

    Fitted once on a grid (worst relative error over the published points of
    ``tests/cluster/test_planner_published.py``: Narayanan et al. 2021 Table 2, ZeRO-3 175B
    and 530B on 384–2240 A100s; MosaicML LLM Foundry FSDP MPT-30B/70B on 64–128 A100s),
    not per point.
    """

    compute_efficiency: float = 0.75  # of peak, on the FLOPs the hardware executes
    network_efficiency: float = 0.70  # of NIC line rate achieved by NCCL collectives
    nvlink_efficiency: float = 0.70  # of one NVLink direction achieved by NCCL collectives
    overlap: float = 0.70  # fraction of the shorter of compute/comm hidden behind the longer
    memory_headroom: float = 0.10  # of GPU memory kept for CUDA context, allocator, buffers
    pcie_bytes_per_s: float = 25e9  # achieved host↔GPU bandwidth (PCIe 4.0 x16) for offload


@dataclass(frozen=True)
class StepTime:
    """Where one optimizer step's time goes, and what it achieves."""

    compute_seconds: float
    comm_seconds: float
    offload_seconds: float
    step_seconds: float
    bound: str
    mfu: float
    hardware_tflops_per_gpu: float
    comm: CommVolume


@dataclass(frozen=True)
class Throughput:
    """An assumed achieved rate that replaces the step-time model (at most one is set)."""

    mfu: float | None = None
    flops_per_gpu: float | None = None


def step_time(
    cfg: ModelConfig,
    parallel: ParallelSpec,
    acc: Accelerator,
    *,
    nodes: int,
    seq_len: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    checkpointing: bool,
    step_model: StepModel,
    assumed: Throughput | None = None,
) -> StepTime:
    """Compute, communication, offload and step seconds, bound and MFU of one configuration.

    Args:
        cfg: the model shape.
        parallel: ZeRO stage, offload and ZeRO++ knobs.
        acc: the accelerator (peak FLOP/s, links).
        nodes: nodes; every GPU is a data-parallel rank.
        seq_len: sequence length.
        micro_batch_size: sequences per GPU per forward.
        grad_accum_steps: micro-batches per optimizer step.
        checkpointing: activation recomputation (its forward runs twice).
        step_model: the model's constants.
        assumed: an achieved MFU or FLOP/s per GPU to use instead of the model.

    Raises:
        CrucibleError: the accelerator has no bandwidth for a link the run crosses.
    """
    sm, p = step_model, parallel
    n = nodes * acc.gpus_per_node
    tokens_per_gpu = micro_batch_size * grad_accum_steps * seq_len
    hw_flops = tokens_per_gpu * hardware_flops_per_token(cfg, seq_len, recompute=checkpointing)
    model_flops = tokens_per_gpu * model_flops_per_token(cfg, seq_len)
    comm = zero_comm_volume(
        num_params(cfg),
        p.zero_stage,
        acc.gpus_per_node,
        nodes,
        grad_accum_steps,
        p.zero_hpz_partition_size,
        p.zero_quantized_weights,
        p.zero_quantized_gradients,
    )
    if comm.inter_node_bytes and not acc.inter_node_bytes_per_s:
        raise CrucibleError(
            f"cluster.gpu {acc.name} has no inter-node bandwidth in the catalogue; set "
            "cluster.gpu (e.g. a100-80gb) or cluster.nic_gbps_per_gpu to plan several nodes"
        )
    if comm.intra_node_bytes and not acc.intra_node_bytes_per_s:
        raise CrucibleError(
            f"cluster.gpu {acc.name} has no intra-node bandwidth in the catalogue; set "
            "cluster.gpu (e.g. a100-80gb) or cluster.nvlink_gb_per_s"
        )
    comm_s = comm.seconds(
        acc.inter_node_bytes_per_s * sm.network_efficiency,
        acc.intra_node_bytes_per_s * sm.nvlink_efficiency,
    )
    shard = num_params(cfg) / n
    offload_s = 0.0
    if p.offload_optimizer != "none":
        offload_s += 4 * shard / sm.pcie_bytes_per_s  # bf16 grads out, bf16 weights back
    if p.offload_params != "none" and p.zero_stage == 3:
        offload_s += grad_accum_steps * 2 * 2 * shard / sm.pcie_bytes_per_s  # fwd + bwd fetch
    assumed = assumed or Throughput()
    if assumed.mfu is not None:
        compute_s = model_flops / (acc.peak_flops * assumed.mfu)
        step_s, bound = compute_s, "assumed MFU"
    elif assumed.flops_per_gpu is not None:
        compute_s = hw_flops / assumed.flops_per_gpu
        step_s, bound = compute_s, "assumed throughput"
    else:
        compute_s = hw_flops / (acc.peak_flops * sm.compute_efficiency)
        longer, shorter = max(compute_s, comm_s), min(compute_s, comm_s)
        step_s = longer + (1 - sm.overlap) * shorter + offload_s
        bound = "network" if comm_s > compute_s else "compute"
    return StepTime(
        compute_seconds=compute_s,
        comm_seconds=comm_s,
        offload_seconds=offload_s,
        step_seconds=step_s,
        bound=bound,
        mfu=model_flops / (step_s * acc.peak_flops),
        hardware_tflops_per_gpu=hw_flops / step_s / 1e12,
        comm=comm,
    )
