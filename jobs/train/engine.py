"""The model as DeepSpeed trains it: built sharded under ZeRO-3 (or plain below stage 3),
AdamW's parameter groups, and the global batch cut into micro-batches with the model's
keyword inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from crucible.cluster.plan import RunPlan
from crucible.cluster.storage import Location
from crucible.jobs.spec import RewardRunSpec, TrainRunSpec

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
        if not p.requires_grad:  # frozen (a LoRA run's base): no optimizer state
            continue
        is_matrix = len(getattr(p, "ds_shape", None) or p.shape) >= 2
        (decay if is_matrix and "pos_emb" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(
    spec: TrainRunSpec,
    plan: RunPlan,
    universal: bool = False,
    base: Location | None = None,
    rank: int = 0,
) -> DeepSpeedEngine:
    """The model built sharded under ZeRO-3 (or plain below stage 3), wrapped by DeepSpeed.

    A finetune run's model takes the base's weights (``base``), and with ``lora`` gets
    adapters, before DeepSpeed builds its master weights and optimizer from it.

    Args:
        spec: the train (or finetune) spec.
        plan: this world size's plan (holds the DeepSpeed config).
        universal: configure DeepSpeed to load a universal (world-size-free) checkpoint.
        base: a finetune run's converted base weights (``<run>/base``).
        rank: this rank (rank 0 reads the base's weights under ZeRO-3).
    """
    import deepspeed

    from crucible.jobs.train import hashing_engine
    from crucible.model.gpt import build_model, init_weights, model_class
    from crucible.model.parallelize import build_zero3_model, parallelize
    from crucible.model.reward import RewardModel, init_score

    cfg = spec.model.resolve()
    config = dict(plan.ds_config)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    cls = RewardModel if isinstance(spec, RewardRunSpec) else model_class(cfg)
    if spec.model.parallel.zero_stage == 3:
        model = build_zero3_model(cfg, config, seed=spec.train.seed, init=base is None, cls=cls)
    else:
        model = init_weights(build_model(cfg, cls=cls), seed=spec.train.seed)
    if base is not None:
        from crucible.jobs.finetune.base import load_base

        load_base(model, base, rank)
    if isinstance(model, RewardModel):
        init_score(model)  # a new head on the base's trunk
    model = parallelize(model, spec.model.parallel)
    lora = getattr(spec, "lora", None)
    if lora is not None:
        from crucible.jobs.finetune.lora import apply_lora

        model = apply_lora(model, lora, seed=spec.train.seed)
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


# The reader's optional tensors, by the model's keyword: doc_index and position_ids are there
# when the reader was asked for document masks or reads fine-tuning shards (examples packed
# whole, positions restarting per example); token types and next-sentence labels in masked-LM
# batches.
_MODEL_INPUTS = {
    "doc_index": "doc_ids",
    "position_ids": "positions",
    "token_type_ids": "token_types",
    "next_sentence_label": "nsp_labels",
}


def model_inputs(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's ``forward`` that micro-batch ``mb`` holds.

    Args:
        mb: a micro-batch from :func:`micro_batches`.
    """
    return {arg: mb[key] for key, arg in _MODEL_INPUTS.items() if key in mb}
