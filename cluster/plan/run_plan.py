"""What every rank of a run executes: the batch shape, the step count, the DeepSpeed config
and the memory it needs. The train job runs exactly this; ``crucible plan`` and ``crucible
train run --dry-run`` print it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crucible.cluster.plan.memory import MemoryPerGpu, memory_per_gpu
from crucible.model.accounting import model_flops_per_token, num_params
from crucible.model.parallelize import build_deepspeed_config

if TYPE_CHECKING:
    from crucible.model.config import ModelConfig
    from crucible.model.spec import ParallelSpec


@dataclass(frozen=True)
class RunPlan:
    """What each of ``world_size`` ranks does per optimizer step, and what it holds."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    total_steps: int
    params: int
    flops_per_token: float
    """Model FLOPs per token (6N + attention, no recomputation)."""
    memory: MemoryPerGpu
    ds_config: dict[str, Any]
    """The DeepSpeed config every rank passes to ``deepspeed.initialize``."""

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks."""
        return self.global_batch_size * self.seq_len


def run_plan(
    cfg: ModelConfig,
    parallel: ParallelSpec,
    *,
    gpus_per_node: int,
    nodes: int,
    global_batch_size: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    seq_len: int,
    total_steps: int,
    scores_stored: bool,
    grad_clip: float | None = 1.0,
    optimizer: dict[str, Any] | None = None,
) -> RunPlan:
    """The plan every rank runs, for a batch shape the caller has checked.

    Args:
        cfg: the model shape.
        parallel: the parallel section as it runs (activation checkpointing decided).
        gpus_per_node: ranks per node.
        nodes: nodes (world size is ``nodes × gpus_per_node``).
        global_batch_size: sequences per optimizer step over all ranks.
        micro_batch_size: sequences per rank per forward.
        grad_accum_steps: micro-batches per optimizer step.
        seq_len: sequence length.
        total_steps: optimizer steps of the run.
        scores_stored: attention scores are materialised (a document mask: no flash kernels).
        grad_clip: global gradient-norm clip (0 or None: none).
        optimizer: DeepSpeed's ``optimizer`` section, or None.
    """
    world = gpus_per_node * nodes
    return RunPlan(
        world_size=world,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seq_len=seq_len,
        total_steps=total_steps,
        params=num_params(cfg),
        flops_per_token=model_flops_per_token(cfg, seq_len),
        memory=memory_per_gpu(
            cfg,
            parallel,
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            scores_stored=scores_stored,
        ),
        ds_config=build_deepspeed_config(
            parallel,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            world_size=world,
            grad_clip=grad_clip,
            optimizer=optimizer,
            num_params=num_params(cfg),
        ),
    )
