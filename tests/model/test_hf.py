"""Logit parity with Hugging Face transformers after conversion, in both directions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT
from crucible.model.hf import config_from_hf, from_hf, hf_config, hf_family, to_hf

pytest.importorskip("transformers")


def _hf_logits(hf: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens).logits


def _same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    resolved = lambda c: c.model_dump() | {"d_ff": c.ffn_dim, "n_kv_heads": c.kv_heads}  # noqa: E731
    return resolved(a) == resolved(b)


def _variants(cfg: ModelConfig) -> list[ModelConfig]:
    return [cfg, cfg.model_copy(update={"tie_embeddings": not cfg.tie_embeddings})]


@pytest.mark.parametrize("kind", ["gpt_cfg", "llama_cfg"])
@pytest.mark.parametrize("flip_tie", [False, True])
def test_crucible_to_hf_parity(
    kind: str, flip_tie: bool, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    cfg: ModelConfig = _variants(request.getfixturevalue(kind))[int(flip_tie)]
    if kind == "llama_cfg":
        cfg = cfg.model_copy(update={"rope_theta": 500.0})  # a non-default base must carry over
    model = make_model(cfg, seed=5)
    # Non-trivial norms and biases so a mis-mapped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf = to_hf(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    ours = model(tokens)[0].detach()
    diff = (_hf_logits(hf, tokens) - ours).abs().max().item()
    assert diff <= 1e-4, diff
    assert _same_shape(config_from_hf(hf.config), cfg)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_to_crucible_parity(family: str, gpt_cfg: ModelConfig, llama_cfg: ModelConfig) -> None:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = gpt_cfg if family == "gpt2" else llama_cfg.model_copy(update={"bias": True})
    torch.manual_seed(7)
    cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    hf = cls(hf_config(cfg)).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb them
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = from_hf(hf)
    assert _same_shape(model.cfg, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    diff = (_hf_logits(hf, tokens) - model(tokens)[0].detach()).abs().max().item()
    assert diff <= 1e-4, diff
    # Round trip back to HF gives the same weights.
    again = to_hf(model).state_dict()
    for name, w in hf.state_dict().items():
        torch.testing.assert_close(again[name], w, rtol=0, atol=0)


def test_unsupported_combinations_are_rejected(gpt_cfg: ModelConfig) -> None:
    with pytest.raises(CrucibleError, match="no Hugging Face architecture"):
        hf_family(gpt_cfg.model_copy(update={"norm": "rmsnorm"}))
    with pytest.raises(CrucibleError, match="no Hugging Face architecture"):
        hf_family(gpt_cfg.model_copy(update={"n_kv_heads": 2}))
    from transformers import BertConfig, GPT2Config, T5Config

    with pytest.raises(CrucibleError, match="unsupported Hugging Face model_type 't5'"):
        config_from_hf(T5Config())
    with pytest.raises(CrucibleError, match="not the exact GELU"):
        config_from_hf(BertConfig(hidden_act="relu"))
    with pytest.raises(CrucibleError, match="not tanh-GELU"):
        config_from_hf(GPT2Config(activation_function="relu"))
