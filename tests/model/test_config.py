"""Spec validation: impossible shapes fail naming the field; presets resolve with overrides."""

from __future__ import annotations

import pytest

from crucible.config import validate
from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig
from crucible.model.spec import ModelSpec, resolve_model

BASE = dict(vocab_size=100, n_layers=2, n_heads=4, d_model=64, max_seq_len=32)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"n_heads": 5}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_kv_heads": 8}, "n_kv_heads"),
        ({"pos": "rotary", "d_model": 36, "n_heads": 4}, "pos"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": -1}, "n_layers"),
        ({"d_ff": 0}, "d_ff"),
        ({"dropout": 1.5}, "dropout"),
        ({"norm": "batchnorm"}, "norm"),
        ({"n_head": 4}, "n_head"),
    ],
)
def test_invalid_config_names_field(override: dict, field: str) -> None:
    with pytest.raises(CrucibleError, match=rf"spec: (unknown key )?{field}\b"):
        validate(ModelConfig, BASE | override)


def test_error_message_explains() -> None:
    with pytest.raises(CrucibleError, match=r"n_heads = 5 is invalid: n_heads must divide d_model"):
        validate(ModelConfig, BASE | {"n_heads": 5})


def test_derived_sizes() -> None:
    cfg = ModelConfig(**BASE)
    assert (cfg.head_dim, cfg.kv_heads, cfg.ffn_dim) == (16, 4, 256)
    swiglu = ModelConfig(**BASE | {"mlp": "swiglu", "d_model": 4096, "n_heads": 32})
    assert swiglu.ffn_dim == 11008  # LLaMA-7B's published width from the 8/3·d rule


def test_spec_preset_with_overrides() -> None:
    cfg = resolve_model({"preset": "gpt2-small", "n_layers": 4, "dropout": 0.1})
    assert (cfg.n_layers, cfg.d_model, cfg.dropout, cfg.vocab_size) == (4, 768, 0.1, 50257)


def test_spec_override_that_breaks_the_preset_names_field() -> None:
    with pytest.raises(CrucibleError, match=r"model: n_heads = 7 is invalid"):
        resolve_model({"preset": "gpt2-small", "n_heads": 7})


def test_unknown_preset_lists_close_names() -> None:
    with pytest.raises(CrucibleError, match=r"preset.*did you mean .*gpt2-small"):
        resolve_model("gpt2-smal")
    with pytest.raises(CrucibleError, match=r"did you mean .*llama2-70b"):
        resolve_model({"preset": "llama2-70"})


def test_spec_without_preset_needs_every_size() -> None:
    with pytest.raises(CrucibleError, match="model: vocab_size is required"):
        resolve_model({"n_layers": 2, "n_heads": 2, "d_model": 8, "max_seq_len": 8})
    assert resolve_model(dict(BASE)) == ModelConfig(**BASE)


def test_spec_is_strict_and_carries_parallel() -> None:
    with pytest.raises(CrucibleError, match=r"unknown key parallel.zero_stag; did you mean"):
        validate(ModelSpec, {"preset": "tiny", "parallel": {"zero_stag": 2}}, source="model")
    spec = validate(ModelSpec, {"preset": "tiny", "parallel": {"zero_stage": 2}})
    assert spec.parallel.zero_stage == 2
    assert spec.resolve().d_model == 64
