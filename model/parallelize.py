"""Everything that wraps the GPT for distributed training, kept out of the model itself.

:func:`build_deepspeed_config` turns the typed ``model.parallel`` section
(:class:`crucible.model.spec.ParallelSpec`) into a DeepSpeed config; :func:`parallelize`
applies activation checkpointing and ``torch.compile`` (in that order, see there); :func:`build_zero3_model` constructs a model
already sharded under ``deepspeed.zero.Init`` so no rank ever holds the full weights.

DeepSpeed is imported inside the functions that need it: the spec and config generation
stay importable (and fast) where DeepSpeed is absent or slow to import.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from crucible.model.config import ModelConfig
    from crucible.model.gpt import GPT
    from crucible.model.spec import ParallelSpec


def build_deepspeed_config(
    parallel: ParallelSpec,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float | None = 1.0,
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    steps_per_print: int = 1_000_000,
    num_params: int | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config dict for ``parallel`` and the batch shape.

    Args:
        parallel: the typed parallelism section.
        micro_batch_size: sequences per rank per forward.
        grad_accum_steps: micro-batches per optimizer step.
        world_size: data-parallel ranks; DeepSpeed checks train_batch_size against it.
        grad_clip: global gradient-norm clip; None or 0 disables it.
        optimizer: DeepSpeed ``optimizer`` section (e.g. ``{"type": "AdamW", "params":
            {...}}``); None when the caller passes a torch optimizer to ``initialize``.
        scheduler: DeepSpeed ``scheduler`` section, or None.
        steps_per_print: DeepSpeed's own logging interval (crucible logs its own metrics).
        num_params: the model's parameter count; caps the bucket sizes, which DeepSpeed
            allocates whole (ZeRO-3's default 5e8-element reduce bucket is 1 GB in bf16,
            2 GB in fp32, on every rank, however small the model).
    """
    for name, value in [
        ("micro_batch_size", micro_batch_size),
        ("grad_accum_steps", grad_accum_steps),
        ("world_size", world_size),
    ]:
        if value < 1:
            raise CrucibleError(f"{name} must be at least 1, got {value}")
    zero: dict[str, Any] = {
        "stage": parallel.zero_stage,
        "overlap_comm": parallel.overlap_comm,
        "contiguous_gradients": parallel.contiguous_gradients,
        "reduce_bucket_size": _capped(parallel.reduce_bucket_size, num_params),
    }
    if parallel.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": parallel.offload_optimizer, "pin_memory": True}
    if parallel.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": _capped(parallel.prefetch_bucket_size, num_params),
            "stage3_param_persistence_threshold": parallel.param_persistence_threshold,
            "stage3_max_live_parameters": parallel.max_live_parameters,
            # Checkpoints keep every rank's shard; exports gather them (see jobs/export).
            "stage3_gather_16bit_weights_on_model_save": False,
            "zero_hpz_partition_size": parallel.zero_hpz_partition_size,
            "zero_quantized_weights": parallel.zero_quantized_weights,
            "zero_quantized_gradients": parallel.zero_quantized_gradients,
        }
        if parallel.offload_params != "none":
            zero["offload_param"] = {"device": parallel.offload_params, "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": parallel.precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
    }
    if optimizer is not None:
        config["optimizer"] = optimizer
    if scheduler is not None:
        config["scheduler"] = scheduler
    return config


def _capped(size: int, num_params: int | None) -> int:
    return size if num_params is None else max(1, min(size, num_params))


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint  # torch-free spec import path

    # Non-reentrant checkpointing: works with keyword args, ZeRO-3's parameter hooks and
    # torch.compile, and does not need inputs that require grad.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def set_activation_checkpointing(model: GPT, enabled: bool) -> GPT:
    """Recompute every block's activations in backward (or stop doing so).

    Wraps each block's ``forward`` in place rather than the module, so parameter names and
    state dicts stay exactly those of the plain model.

    Args:
        model: a :class:`GPT`.
        enabled: True to checkpoint every block, False to undo it.
    """
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # undo an earlier wrap
        if enabled:
            block.forward = functools.partial(_checkpointed, block.forward)
    return model


def parallelize(model: GPT, parallel: ParallelSpec) -> GPT:
    """Apply activation checkpointing, then ``torch.compile``, per block, in place.

    Order (as torchtitan's parallelize): checkpointing first, so each compiled block
    contains its checkpoint region and the recomputation is compiled too; compile per block
    rather than the whole model, which keeps compile time flat in depth (every block has the
    same graph) and lets ZeRO-3's per-module gather/release hooks run between blocks. The
    result is then handed to ``deepspeed.initialize`` (with :func:`build_deepspeed_config`),
    which shards it last.

    Args:
        model: a :class:`GPT` (plain, or built under :func:`build_zero3_model`).
        parallel: the typed parallelism section.
    """
    if parallel.activation_checkpointing:
        set_activation_checkpointing(model, True)
    if parallel.compile:
        for block in model.blocks:
            block.compile()
    return model


def build_zero3_model(
    cfg: ModelConfig,
    ds_config: dict[str, Any],
    seed: int = 0,
    init: bool = True,
    cls: type[GPT] | None = None,
) -> GPT:
    """Construct a :class:`GPT` already partitioned across ranks by ``deepspeed.zero.Init``.

    Each parameter is sharded as soon as its module is built, so no rank holds the full
    model. With ``init``, parameters are gathered one at a time, initialised on rank 0 with
    :func:`crucible.model.gpt.init_parameter` (the same values :func:`init_weights` gives
    with the same seed on the same device type), and re-partitioned.

    Args:
        cfg: the model shape.
        ds_config: the DeepSpeed config (from :func:`build_deepspeed_config`), ZeRO stage 3.
        seed: initialisation seed.
        init: initialise weights (False leaves DeepSpeed's default values, for loading).
        cls: the class to build (default :func:`~crucible.model.gpt.model_class`).
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    from crucible.model.gpt import init_parameter, model_class

    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise CrucibleError("build_zero3_model needs a DeepSpeed config with ZeRO stage 3")
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = (cls or model_class(cfg))(cfg)
    if init:
        rank = dist.get_rank() if dist.is_initialized() else 0
        gen = None
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    if gen is None:
                        gen = torch.Generator(device=p.device).manual_seed(seed)
                    init_parameter(name, p, cfg, gen)
    return model
