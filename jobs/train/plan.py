"""The per-rank plan of a train run: batch shape, steps, DeepSpeed config, memory per rank.

Computed the same way by ``--dry-run`` (no GPU, no cluster, no shards needed) and by every
worker, so what the dry run prints is what the workers run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from crucible.cluster.memory import activation_bytes, logits_bytes, model_states
from crucible.errors import CrucibleError
from crucible.model.accounting import largest_layer_params, model_flops_per_token, num_params
from crucible.model.parallelize import build_deepspeed_config

if TYPE_CHECKING:
    from crucible.jobs.spec import TrainRunSpec


@dataclass(frozen=True)
class TrainPlan:
    """What each of ``world_size`` ranks does per optimizer step, and what it holds."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    total_steps: int
    tokens_per_step: int
    params: int
    flops_per_token: float
    model_state_bytes_per_rank: int
    gather_buffer_bytes: int
    activation_bytes_per_rank: int
    logits_bytes_per_rank: int
    ds_config: dict[str, Any]

    @property
    def memory_bytes_per_rank(self) -> int:
        """Model states + ZeRO-3 gather buffer + activations + logits, per rank."""
        return (
            self.model_state_bytes_per_rank
            + self.gather_buffer_bytes
            + self.activation_bytes_per_rank
            + self.logits_bytes_per_rank
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON and the dry-run printout)."""
        return asdict(self) | {"memory_bytes_per_rank": self.memory_bytes_per_rank}


def optimizer_section(spec: TrainRunSpec, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's ``optimizer`` section: AdamW with the spec's hyper-parameters.

    On CPU DeepSpeed's fused Adam is unavailable, so ``torch_adam`` selects torch's AdamW.

    Args:
        spec: the train spec.
        use_gpu: whether workers run on GPUs.
    """
    o = spec.optim
    params: dict[str, Any] = {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "adam_w_mode": True,
    }
    if not use_gpu:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def make_plan(
    spec: TrainRunSpec, world_size: int, seq_len: int | None = None, use_gpu: bool = False
) -> TrainPlan:
    """The plan of ``spec`` on ``world_size`` ranks.

    Args:
        spec: the train spec.
        world_size: data-parallel ranks.
        seq_len: the shards' sequence length (default: the model's max_seq_len).
        use_gpu: whether workers run on GPUs (selects the Adam implementation).

    Raises:
        CrucibleError: the global batch does not split into micro-batches on the ranks.
    """
    o, t = spec.optim, spec.train
    cfg = spec.model.resolve()
    seq = seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise CrucibleError(
            f"the shards' sequence length {seq} exceeds model.max_seq_len {cfg.max_seq_len}; "
            "raise max_seq_len or use shards packed for this model"
        )
    per_rank, rem = divmod(o.global_batch_size, world_size)
    accum, rem2 = divmod(per_rank, o.micro_batch_size) if not rem else (0, 1)
    if rem or rem2 or accum < 1:
        raise CrucibleError(
            f"optim.global_batch_size {o.global_batch_size} must be a multiple of "
            f"optim.micro_batch_size {o.micro_batch_size} × {world_size} workers; "
            "change one of them"
        )
    tokens_per_step = o.global_batch_size * seq
    if t.max_steps is not None:
        total = t.max_steps
    else:
        assert t.max_tokens is not None
        total = math.ceil(t.max_tokens / tokens_per_step)
    parallel = spec.model.parallel
    ds_config = build_deepspeed_config(
        parallel,
        micro_batch_size=o.micro_batch_size,
        grad_accum_steps=accum,
        world_size=world_size,
        grad_clip=o.grad_clip,
        optimizer=optimizer_section(spec, use_gpu),
    )
    # The planner's arithmetic (cluster/memory.py): DeepSpeed's own model-state estimate,
    # whose ZeRO-3 figure includes the 4 × largest-layer buffer a gather needs.
    states = model_states(
        parallel.zero_stage,
        num_params(cfg),
        largest_layer_params(cfg),
        gpus_per_node=world_size,
        nodes=1,
        offload_optimizer=parallel.offload_optimizer != "none",
        offload_params=parallel.offload_params != "none" and parallel.zero_stage == 3,
    )
    scores_stored = spec.data.mask_cross_document  # a document mask rules out flash kernels
    return TrainPlan(
        world_size=world_size,
        global_batch_size=o.global_batch_size,
        micro_batch_size=o.micro_batch_size,
        grad_accum_steps=accum,
        seq_len=seq,
        total_steps=total,
        tokens_per_step=tokens_per_step,
        params=num_params(cfg),
        flops_per_token=model_flops_per_token(cfg, seq),
        model_state_bytes_per_rank=states.gpu_bytes - states.largest_layer_bytes,
        gather_buffer_bytes=states.largest_layer_bytes,
        activation_bytes_per_rank=activation_bytes(
            cfg, o.micro_batch_size, seq, parallel.activation_checkpointing, scores_stored
        ),
        logits_bytes_per_rank=logits_bytes(cfg, o.micro_batch_size, seq),
        ds_config=ds_config,
    )


def _gib(n: float) -> str:
    if n < 2**30:  # tiny models: MiB keeps the figures readable
        return f"{n / 2**20:,.2f} MiB"
    return f"{n / 2**30:,.2f} GiB"


def format_plan(spec: TrainRunSpec, plan: TrainPlan) -> str:
    """The dry-run printout: the resolved DeepSpeed config and the per-rank plan.

    Args:
        spec: the train spec.
        plan: from :func:`make_plan`.
    """
    cfg = spec.model.resolve()
    tokens = plan.total_steps * plan.tokens_per_step
    lines = [
        f"run {spec.name}: {spec.model.preset or 'custom'} model, {plan.params:,} parameters "
        f"({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"vocab {cfg.vocab_size})",
        f"workers: {plan.world_size} × {spec.train.cpus_per_worker:g} CPU"
        + (
            ", GPU (NCCL)"
            if spec.train.use_gpu
            else ", GPU if the cluster has them"
            if spec.train.use_gpu is None
            else ", CPU (gloo)"
        ),
        f"batch: global {plan.global_batch_size} sequences × {plan.seq_len} tokens = "
        f"{plan.tokens_per_step:,} tokens/step; micro-batch {plan.micro_batch_size} × "
        f"{plan.grad_accum_steps} accumulation steps × {plan.world_size} ranks",
        f"steps: {plan.total_steps:,} ({tokens:,.0f} tokens, "
        f"{6 * plan.params * tokens:.3g} FLOPs at 6·N·D; "
        f"{plan.flops_per_token * tokens:.3g} model FLOPs with attention)",
        f"memory per rank: {_gib(plan.memory_bytes_per_rank)} = model states "
        f"{_gib(plan.model_state_bytes_per_rank)} (ZeRO-{spec.model.parallel.zero_stage}, "
        f"DeepSpeed's estimate) + gather buffer {_gib(plan.gather_buffer_bytes)} "
        f"+ activations {_gib(plan.activation_bytes_per_rank)} (micro-batch "
        f"{plan.micro_batch_size}, checkpointing "
        f"{'on' if spec.model.parallel.activation_checkpointing else 'off'}) + logits "
        f"{_gib(plan.logits_bytes_per_rank)}",
        f"checkpoints: every {spec.checkpoint.every_steps} steps, keep last "
        f"{spec.checkpoint.keep_last}"
        + (f" + every {spec.checkpoint.keep_every}" if spec.checkpoint.keep_every else "")
        + f", about {_gib(14 * plan.params)} each (14 bytes/param)",
        "DeepSpeed config:",
        json.dumps(plan.ds_config, indent=2),
    ]
    return "\n".join(lines)
