"""Per-GPU memory of a training run: ZeRO model states, activations, logits.

Model states follow DeepSpeed's own estimators byte for byte
(``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` and
``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` in
DeepSpeed 0.19.8; the tests compare against them on a grid). Those count 18 bytes per
parameter besides the bf16 weights (bf16 grads 2, fp32 grads 4, fp32 master 4, Adam m and v
8) and, for ZeRO-3, 4 × the largest layer for gathering it. DeepSpeed has no stage-1 or
stage-0 estimator; ours use the same 18-byte accounting with stage 1 keeping the bf16
gradients whole (4Ψ + 16Ψ/N) and stage 0 keeping everything (20Ψ).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 1, no tensor parallelism): s·b·h·(34 + 5·a·s/h) bytes per layer in
16-bit. The 5·a·s/h term is the attention score/softmax/dropout storage, which flash
attention never materialises (crucible's GPT calls SDPA, which picks flash kernels on
A100/H100 unless a document mask is used). With full recomputation each layer keeps only
its 2·s·b·h-byte input, plus one layer's full activations while it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crucible.model.accounting import largest_layer_params, num_params

if TYPE_CHECKING:
    from crucible.model.config import ModelConfig
    from crucible.model.spec import ParallelSpec

GiB = 2**30


def format_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes as GiB, or as MiB below one GiB (so tiny models stay readable).

    Args:
        n: bytes.
        digits: decimals shown.
    """
    if n < GiB:
        return f"{n / 2**20:,.{digits}f} MiB"
    return f"{n / GiB:,.{digits}f} GiB"


@dataclass(frozen=True)
class StateMemory:
    """Model-state bytes per GPU and per node's CPU memory (DeepSpeed's estimate)."""

    gpu_bytes: int
    cpu_bytes: int
    largest_layer_bytes: int


def zero3_states(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> StateMemory:
    """ZeRO-3 model states, exactly as ``estimate_zero3_model_states_mem_needs`` computes them.

    Args:
        total_params: parameters of the model.
        largest_layer_params: parameters of the largest module (gathered whole).
        num_gpus_per_node: GPUs per node.
        num_nodes: nodes.
        cpu_offload: optimizer states offloaded to CPU.
        cpu_offload_params: parameters offloaded to CPU too (needs ``cpu_offload``).
        zero_init: the model is built under ``deepspeed.zero.Init``.
        additional_buffer_factor: DeepSpeed's CPU-side safety factor.
    """
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu = largest
            per = 18 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 18 * gpus_factor)
        else:
            gpu = largest + int(2 * total_params / total_gpus)
            per = 16 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 16 * gpus_factor)
        cpu = total_params * per * additional_buffer_factor
    else:
        gpu = largest + int(18 * total_params / total_gpus)
        base = largest_layer_params if zero_init else total_params
        cpu = base * 4 * num_gpus_per_node * additional_buffer_factor
    return StateMemory(int(gpu), int(cpu), largest)


def zero2_states(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    additional_buffer_factor: float = 1.5,
) -> StateMemory:
    """ZeRO-2 model states, exactly as ``estimate_zero2_model_states_mem_needs`` computes them.

    Args:
        total_params: parameters of the model.
        num_gpus_per_node: GPUs per node.
        num_nodes: nodes.
        cpu_offload: optimizer states (and gradients) offloaded to CPU.
        additional_buffer_factor: DeepSpeed's CPU-side safety factor.
    """
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu = 2 * total_params + int(18 * total_params / total_gpus)
        cpu = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return StateMemory(int(gpu), int(cpu), 0)


def model_states(
    stage: int,
    total_params: int,
    largest_layer_params: int,
    gpus_per_node: int,
    nodes: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> StateMemory:
    """Model-state memory per GPU for ZeRO ``stage`` 0–3 (see the module docstring).

    Args:
        stage: ZeRO stage.
        total_params: parameters of the model.
        largest_layer_params: parameters of the largest module.
        gpus_per_node: GPUs per node.
        nodes: nodes (all GPUs are data-parallel ranks).
        offload_optimizer: optimizer states in CPU memory.
        offload_params: ZeRO-3 parameter shards in CPU memory.
    """
    if stage == 3:
        return zero3_states(
            total_params,
            largest_layer_params,
            gpus_per_node,
            nodes,
            cpu_offload=offload_optimizer or offload_params,
            cpu_offload_params=offload_params,
        )
    if stage == 2:
        return zero2_states(total_params, gpus_per_node, nodes, cpu_offload=offload_optimizer)
    n = gpus_per_node * nodes
    if stage == 1:
        # bf16 weights and gradients whole; fp32 grads, master weights and Adam sharded.
        extra = zero2_states(total_params, gpus_per_node, nodes, offload_optimizer)
        gpu = 4 * total_params + (0 if offload_optimizer else int(16 * total_params / n))
        return StateMemory(gpu, extra.cpu_bytes, 0)
    return StateMemory(20 * total_params, 0, 0)


def layer_activation_bytes(cfg: ModelConfig, micro: int, seq: int, scores_stored: bool) -> int:
    """One transformer layer's saved activations for one micro-batch (Korthikanti eq. 1).

    Args:
        cfg: the model shape.
        micro: sequences in the micro-batch (b).
        seq: sequence length (s).
        scores_stored: the attention scores are materialised (no flash attention).
    """
    s, b, h, a = seq, micro, cfg.d_model, cfg.n_heads
    return int(s * b * h * (34 + (5 * a * s / h if scores_stored else 0)))


def activation_bytes(
    cfg: ModelConfig, micro: int, seq: int, checkpointing: bool, scores_stored: bool = False
) -> int:
    """Saved activations of all layers for one micro-batch, per GPU (no tensor parallelism).

    Args:
        cfg: the model shape.
        micro: sequences in the micro-batch.
        seq: sequence length.
        checkpointing: full activation recomputation (only layer inputs are kept).
        scores_stored: the attention scores are materialised (no flash attention).
    """
    per_layer = layer_activation_bytes(cfg, micro, seq, scores_stored)
    if checkpointing:
        return cfg.n_layers * 2 * seq * micro * cfg.d_model + per_layer
    return cfg.n_layers * per_layer


def logits_bytes(cfg: ModelConfig, micro: int, seq: int) -> int:
    """Output logits of one micro-batch: bf16 logits (2 bytes), the fp32 copy the loss takes
    (4) and its fp32 log-softmax saved for backward (4), per token and vocabulary entry.

    Args:
        cfg: the model shape.
        micro: sequences in the micro-batch.
        seq: sequence length.
    """
    return 10 * micro * seq * cfg.vocab_size


@dataclass(frozen=True)
class MemoryPerGpu:
    """Peak memory of one GPU (one data-parallel rank), by what holds it."""

    state_bytes: int
    """Model states, DeepSpeed's estimate (includes the ZeRO-3 gather buffer)."""
    gather_buffer_bytes: int
    """The part of :attr:`state_bytes` that gathers the largest layer whole (ZeRO-3)."""
    state_cpu_bytes_per_node: int
    """Host memory per node for model states (offload, ``zero.Init``)."""
    hpz_bytes: int
    """ZeRO++ hpZ secondary weight shard."""
    activation_bytes: int
    logits_bytes: int

    @property
    def total_bytes(self) -> int:
        """Model states + hpZ shard + activations + logits."""
        return self.state_bytes + self.hpz_bytes + self.activation_bytes + self.logits_bytes


def state_memory(
    cfg: ModelConfig, parallel: ParallelSpec, stage: int, gpus_per_node: int, nodes: int
) -> StateMemory:
    """Model-state memory of ``cfg`` at ZeRO ``stage`` with ``parallel``'s offload knobs.

    Args:
        cfg: the model shape.
        parallel: the parallel section (offload settings).
        stage: ZeRO stage (may differ from ``parallel.zero_stage``, to compare stages).
        gpus_per_node: GPUs per node.
        nodes: nodes.
    """
    return model_states(
        stage,
        num_params(cfg),
        largest_layer_params(cfg),
        gpus_per_node,
        nodes,
        offload_optimizer=parallel.offload_optimizer != "none",
        offload_params=parallel.offload_params != "none" and stage == 3,
    )


def hpz_bytes(cfg: ModelConfig, parallel: ParallelSpec) -> int:
    """The ZeRO++ hpZ secondary shard: bf16 weights over the hpZ group (0 without hpZ).

    Args:
        cfg: the model shape.
        parallel: the parallel section.
    """
    hpz = parallel.zero_hpz_partition_size
    return int(2 * num_params(cfg) / hpz) if hpz > 1 else 0


def memory_per_gpu(
    cfg: ModelConfig,
    parallel: ParallelSpec,
    *,
    gpus_per_node: int,
    nodes: int,
    micro_batch_size: int,
    seq_len: int,
    scores_stored: bool,
) -> MemoryPerGpu:
    """Peak memory of one GPU training ``cfg`` with ``parallel`` on ``nodes`` × ``gpus_per_node``.

    Args:
        cfg: the model shape.
        parallel: ZeRO stage, offload, hpZ and activation checkpointing.
        gpus_per_node: GPUs per node.
        nodes: nodes (every GPU is a data-parallel rank).
        micro_batch_size: sequences per GPU per forward.
        seq_len: sequence length.
        scores_stored: attention scores are materialised (no flash attention).
    """
    states = state_memory(cfg, parallel, parallel.zero_stage, gpus_per_node, nodes)
    ckpt = parallel.activation_checkpointing
    return MemoryPerGpu(
        state_bytes=states.gpu_bytes,
        gather_buffer_bytes=states.largest_layer_bytes,
        state_cpu_bytes_per_node=states.cpu_bytes,
        hpz_bytes=hpz_bytes(cfg, parallel),
        activation_bytes=activation_bytes(cfg, micro_batch_size, seq_len, ckpt, scores_stored),
        logits_bytes=logits_bytes(cfg, micro_batch_size, seq_len),
    )
