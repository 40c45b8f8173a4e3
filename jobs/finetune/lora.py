"""LoRA through PEFT on crucible's GPT: adapters on the named linear layers, the base frozen;
and the merge back into a plain GPT (for export, generation and evaluation)."""

from __future__ import annotations

from typing import Any

import torch

from crucible.jobs.finetune.spec import LoraSpec
from crucible.model.gpt import GPT


def apply_lora(model: torch.nn.Module, lora: LoraSpec, seed: int) -> Any:
    """``model`` with LoRA adapters (a ``peft.PeftModel``); only the adapters train.

    Args:
        model: a :class:`GPT` (plain or partitioned by ZeRO-3).
        lora: rank, alpha, dropout and target modules.
        seed: the adapters' initialisation seed (the same on every rank).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # a float scale is what PEFT uses
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # A's Kaiming init; B starts at zero, so the model is the base's
    try:
        return get_peft_model(model, config)  # type: ignore[arg-type]
    finally:
        torch.random.set_rng_state(state)


def merge_lora(
    state_dict: dict[str, torch.Tensor], cfg: Any, lora: LoraSpec,
    base: dict[str, torch.Tensor] | None = None,
) -> GPT:  # fmt: skip
    """A plain :class:`GPT` with the adapters of a LoRA checkpoint's state dict merged into
    its weights (W + alpha/r · B·A): no inference cost, the shape of the base (with an
    untied output head where the base ties it and ``lm_head`` has an adapter).

    Args:
        state_dict: the consolidated state dict of the PEFT-wrapped model.
        cfg: the :class:`~crucible.model.config.ModelConfig`.
        lora: the run's LoRA section.
        base: the base's weights (``<run>/base``), for checkpoints that hold the adapters
            alone; None: the state dict holds the base too.
    """
    from crucible.model.gpt import build_model

    plain = build_model(cfg, device="cpu")
    if base is not None:
        plain.load_state_dict(base, strict=not cfg.tie_embeddings)
    model = apply_lora(plain, lora, seed=0)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # a tied head is saved once (under tok_emb); the base's weights may come from ``base``;
    # anything else missing is an error
    missing = [
        k for k in missing
        if not (cfg.tie_embeddings and k.endswith("lm_head.weight"))
        and (base is None or "lora_" in k)
    ]  # fmt: skip
    if missing or unexpected:
        from crucible.errors import CrucibleError

        raise CrucibleError(
            f"the checkpoint does not match the LoRA model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    tied_head = cfg.tie_embeddings and "lm_head" in lora.target_modules
    if tied_head:
        # The head's adapter changes the output projection alone: merged into the table the
        # head shares with the embeddings, it would change the embeddings too. Merge it into
        # a copy; the merged model's head is then its own.
        inner = model.base_model.model
        inner.lm_head.base_layer.weight = torch.nn.Parameter(inner.tok_emb.weight.detach().clone())
    merged: GPT = model.merge_and_unload()
    if tied_head:
        merged.cfg = cfg.model_copy(update={"tie_embeddings": False})
    return merged.eval()


def trainable_share(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counting ZeRO-3 partitions at full size."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
