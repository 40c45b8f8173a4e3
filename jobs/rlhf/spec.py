"""The sections of a rejection-sampling spec."""

from __future__ import annotations

from pydantic import Field

from crucible.config import StrictModel


class SamplingSpec(StrictModel):
    """How answers are drawn from the policy."""

    samples_per_prompt: int = Field(8, ge=2, description="Answers drawn per prompt (K).")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens per answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k likeliest tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: probability mass kept.")
    seed: int = Field(0, description="Batch i is sampled with seed + i.")
    prompts_per_batch: int = Field(
        16, ge=1, description="Prompts per generation batch (times K sequences)."
    )
