"""Fixtures for the model tests: small configs and seeded, materialised models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT, build_model, init_weights


def _make_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    return init_weights(build_model(cfg, device="meta"), seed=seed).eval()


@pytest.fixture
def make_model() -> Callable[..., GPT]:
    """``make_model(cfg, seed=0)``: a materialised fp32 CPU model in eval mode."""
    return _make_model


@pytest.fixture
def gpt_cfg() -> ModelConfig:
    """A tiny GPT-2-style config."""
    return ModelConfig(vocab_size=97, n_layers=2, n_heads=4, d_model=32, max_seq_len=24)


@pytest.fixture
def llama_cfg() -> ModelConfig:
    """A tiny LLaMA-style config with grouped-query attention."""
    return ModelConfig(
        vocab_size=101,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_model=32,
        d_ff=48,
        max_seq_len=24,
        pos="rotary",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    )


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
