"""The sections a finetune spec adds to a train spec: ``base`` (where the weights start)
and ``lora`` (low-rank adapters instead of full fine-tuning)."""

from __future__ import annotations

from pydantic import Field, model_validator

from crucible.config import StrictModel


class BaseSpec(StrictModel):
    """The model fine-tuning starts from: exactly one of ``checkpoint`` or ``hf``."""

    checkpoint: str | None = Field(
        None,
        description="A crucible run, checkpoints directory or step-<N> checkpoint (path or "
        "URI); its newest valid checkpoint is used.",
    )
    hf: str | None = Field(
        None,
        description="A Hugging Face model directory (GPT-2 or Llama architecture, with "
        "config.json, weights and tokenizer.json).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if (self.checkpoint is None) == (self.hf is None):
            raise ValueError("give exactly one of base.checkpoint or base.hf")
        return self


class LoraSpec(StrictModel):
    """LoRA (Hu et al. 2021) through PEFT: W + (alpha / rank) · B·A on the named linear
    layers; the base stays frozen and carries no optimizer state."""

    rank: int = Field(8, ge=1, description="Rank r of each adapter.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["qkv", "proj"],
        description="Linear layers to adapt, by module name: qkv and proj (attention; proj "
        "also matches the MLP's output), fc (GELU MLP), gate and up (SwiGLU MLP), lm_head.",
    )
