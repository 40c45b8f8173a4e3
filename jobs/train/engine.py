"""The model as DeepSpeed trains it: built sharded under ZeRO-3 (or plain below stage 3),
AdamW's parameter groups, and the global batch cut into micro-batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from crucible.cluster.plan import RunPlan
from crucible.jobs.spec import TrainRunSpec

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases, norm scales or position tables (GPT-3).

    Args:
        model: the model (ZeRO-3 parameters report their full shape in ``ds_shape``).
        weight_decay: the decay of the matrices.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        is_matrix = len(getattr(p, "ds_shape", None) or p.shape) >= 2
        (decay if is_matrix and "pos_emb" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(spec: TrainRunSpec, plan: RunPlan, universal: bool = False) -> DeepSpeedEngine:
    """The model built sharded under ZeRO-3 (or plain below stage 3), wrapped by DeepSpeed.

    Args:
        spec: the train spec.
        plan: this world size's plan (holds the DeepSpeed config).
        universal: configure DeepSpeed to load a universal (world-size-free) checkpoint.
    """
    import deepspeed

    from crucible.jobs.train import hashing_engine
    from crucible.model.gpt import build_model, init_weights
    from crucible.model.parallelize import build_zero3_model, parallelize

    cfg = spec.model.resolve()
    config = dict(plan.ds_config)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    if spec.model.parallel.zero_stage == 3:
        model = build_zero3_model(cfg, config, seed=spec.train.seed)
    else:
        model = init_weights(build_model(cfg), seed=spec.train.seed)
    model = parallelize(model, spec.model.parallel)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, spec.optim.weight_decay),
        config=config,
    )
    hashing_engine.install(engine)
    return engine


def micro_batches(
    batch: dict[str, torch.Tensor], micro: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """This rank's slice of the global batch cut into micro-batches of ``micro`` rows, on
    ``device``.

    Args:
        batch: the reader's batch (``input_ids``, ``labels``, maybe ``doc_index``).
        micro: rows per micro-batch.
        device: the engine's device.
    """
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + micro].to(device) for k, v in batch.items()} for i in range(0, n, micro)]
