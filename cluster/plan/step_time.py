"""Step time of one configuration: the GPU's work and ZeRO's communication beside it.

    compute = hardware FLOPs per GPU per step / (peak × compute_efficiency)
    memory  = non-matmul HBM bytes per step / (HBM bandwidth × hbm_efficiency)
    fetch   = micro-batches × modules × zero3_module_seconds            (ZeRO-3 only)
    busy    = compute + memory + fetch
    comm    = cross-node bytes / (NIC × network_efficiency) + NVLink bytes / (NVLink × eff.)
    step    = max(busy, comm) + (1 − overlap) × min(busy, comm) + offload transfers

The memory term is every kernel that is not a matmul (norms, activations, residual adds,
bias gradients, the loss over the vocabulary, Adam, ZeRO's copies; :mod:`.traffic`): its
bytes grow with L·h per token where the FLOPs grow with L·h², so it is 2–3% of a 175B step
on A100s and an eighth of a 1.3B step on an H200. The fetch term is ZeRO-3's per-module work outside
the GPU's kernels: hooks gather and release each module's weights in forward and again in
backward, and the GPU waits on them (DeepSpeed PR 6649 coalesces fetches for that reason).

A run is network-bound when comm > busy. MFU follows as model FLOPs (6N + attention, no
recomputation) over step time × peak. An assumed MFU or throughput replaces the prediction
when given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crucible.cluster.plan.comm import CommVolume, zero_comm_volume
from crucible.cluster.plan.traffic import step_traffic_bytes
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

    Fitted once on a grid to minimise the worst relative error over ten measured points,
    not per point: the published A100 runs of ``tests/cluster/test_planner_published.py``
    (Narayanan et al. 2021 Table 2, ZeRO-3 175B and 530B on 384–2240 A100s; MosaicML LLM
    Foundry FSDP MPT-30B/70B on 64–128 A100s) and crucible's own GPT-3 1.3B and 2.7B on one
    H200 (``tests/cluster/test_planner_measured.py``). The A100 runs pin compute, network
    and overlap; the H200 runs, which have no communication, pin ``zero3_module_seconds``
    (the A100 steps hardly depend on it: under 2% of any). ``hbm_efficiency`` is not fitted
    (the fit is flat between 0.5 and 0.9) but set to what streaming kernels reach. One
    ``compute_efficiency`` for all GPUs is a compromise: large matmuls reach a larger
    fraction of an A100's datasheet peak than of a Hopper's.
    """

    compute_efficiency: float = 0.825  # of peak, on the FLOPs the hardware executes
    hbm_efficiency: float = 0.80  # of HBM bandwidth, on the non-matmul kernels' bytes
    zero3_module_seconds: float = 1.25e-3  # per module ZeRO-3 gathers, per micro-batch
    network_efficiency: float = 0.69  # of NIC line rate achieved by NCCL collectives
    nvlink_efficiency: float = 0.70  # of one NVLink direction achieved by NCCL collectives
    overlap: float = 0.70  # fraction of the shorter of compute/comm hidden behind the longer
    memory_headroom: float = 0.10  # of GPU memory kept for CUDA context, allocator, buffers
    pcie_bytes_per_s: float = 25e9  # achieved host↔GPU bandwidth (PCIe 4.0 x16) for offload


def zero3_modules(cfg: ModelConfig) -> int:
    """Modules whose weights ZeRO-3 gathers and releases one by one: per layer two norms
    and the linear layers (q/k/v, attention output, MLP in (gate and up for SwiGLU), MLP
    out), plus the token and position embeddings, the final norm and the output head."""
    per_layer = 2 + 2 + (3 if cfg.mlp == "swiglu" else 2)
    return cfg.n_layers * per_layer + (4 if cfg.pos == "learned" else 3)


@dataclass(frozen=True)
class StepTime:
    """Where one optimizer step's time goes, and what it achieves."""

    compute_seconds: float
    memory_seconds: float
    fetch_seconds: float
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
    traffic = step_traffic_bytes(
        cfg,
        p,
        num_gpus=n,
        tokens=tokens_per_gpu,
        grad_accum_steps=grad_accum_steps,
        checkpointing=checkpointing,
    )
    # The cpu entry has no catalogued bandwidth: its measured peak is all the model knows.
    memory_s = traffic / (acc.hbm_bytes_per_s * sm.hbm_efficiency) if acc.hbm_bytes_per_s else 0.0
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
    fetch_s = 0.0
    if p.zero_stage == 3:
        fetch_s = grad_accum_steps * zero3_modules(cfg) * sm.zero3_module_seconds
    assumed = assumed or Throughput()
    if assumed.mfu is not None:
        compute_s, memory_s, fetch_s = model_flops / (acc.peak_flops * assumed.mfu), 0.0, 0.0
        step_s, bound = compute_s, "assumed MFU"
    elif assumed.flops_per_gpu is not None:
        compute_s, memory_s, fetch_s = hw_flops / assumed.flops_per_gpu, 0.0, 0.0
        step_s, bound = compute_s, "assumed throughput"
    else:
        compute_s = hw_flops / (acc.peak_flops * sm.compute_efficiency)
        # Matmuls, memory-bound kernels and the waits on ZeRO-3's hooks take turns on the
        # GPU; the collectives run on their own streams beside them.
        busy = compute_s + memory_s + fetch_s
        longer, shorter = max(busy, comm_s), min(busy, comm_s)
        step_s = longer + (1 - sm.overlap) * shorter + offload_s
        bound = "network" if comm_s > busy else "compute"
    return StepTime(
        compute_seconds=compute_s,
        memory_seconds=memory_s,
        fetch_seconds=fetch_s,
        comm_seconds=comm_s,
        offload_seconds=offload_s,
        step_seconds=step_s,
        bound=bound,
        mfu=model_flops / (step_s * acc.peak_flops),
        hardware_tflops_per_gpu=hw_flops / step_s / 1e12,
        comm=comm,
    )
