"""Named model shapes, as data in one place: the published GPT-1/2/3, LLaMA 1/2 and BERT
sizes and tiny ones for tests and the CPU demo.

Sources: GPT-1 (Radford et al. 2018), GPT-2 (Radford et al. 2019), GPT-3 (Brown et al. 2020,
table 2.1), LLaMA (Touvron et al. 2023a, table 2), Llama 2 (Touvron et al. 2023b), BERT
(Devlin et al. 2018, §3). All but BERT are pre-norm decoders (GPT-1 was post-norm; we keep
its shape, not its norm placement). GPT-3 alternated dense and locally banded sparse attention; here every layer is
dense, which changes no parameter count.
"""

from __future__ import annotations

import difflib
from typing import Any

from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig

# GPT-2/3 style: learned positions, LayerNorm, GELU MLP (4·d), biases, tied embeddings.
_GPT: dict[str, Any] = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True)
_GPT2 = dict(_GPT, vocab_size=50257, max_seq_len=1024)
_GPT3 = dict(_GPT, vocab_size=50257, max_seq_len=2048)
# LLaMA style: rotary, RMSNorm, SwiGLU with the published ffn width, no biases, untied head.
_LLAMA: dict[str, Any] = dict(
    pos="rotary",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
    vocab_size=32000,
    max_seq_len=2048,
    norm_eps=1e-6,
)
_LLAMA2 = dict(_LLAMA, max_seq_len=4096, norm_eps=1e-5)
# BERT: a post-norm encoder with learned positions, 2 token types, exact GELU, dropout 0.1,
# LayerNorm eps 1e-12, the uncased WordPiece vocabulary (30,522) and 512 positions.
_BERT: dict[str, Any] = dict(
    _GPT, arch="bert", vocab_size=30522, max_seq_len=512, norm_eps=1e-12, dropout=0.1
)


def _shape(n_layers: int, d_model: int, n_heads: int, **kw: Any) -> dict[str, Any]:
    return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, **kw)


_RAW: dict[str, dict[str, Any]] = {
    # Tiny GPT-2-style model for multi-process CPU tests and the demo.
    "tiny": dict(_GPT, vocab_size=512, max_seq_len=128, **_shape(2, 64, 4)),
    # LLaMA-style like torchtitan's debugmodel (dim 256, 6 layers, 16 heads, vocab 2048).
    "debug": dict(_LLAMA, vocab_size=2048, max_seq_len=512, rope_theta=500000.0)
    | _shape(6, 256, 16),
    # GPT-1 used a 40,478-token BPE vocabulary and a 512-token context.
    "gpt1": dict(_GPT, vocab_size=40478, max_seq_len=512, **_shape(12, 768, 12)),
    "gpt2-small": dict(_GPT2, **_shape(12, 768, 12)),
    "gpt2-medium": dict(_GPT2, **_shape(24, 1024, 16)),
    "gpt2-large": dict(_GPT2, **_shape(36, 1280, 20)),
    "gpt2-xl": dict(_GPT2, **_shape(48, 1600, 25)),
    "gpt3-125m": dict(_GPT3, **_shape(12, 768, 12)),
    "gpt3-350m": dict(_GPT3, **_shape(24, 1024, 16)),
    "gpt3-760m": dict(_GPT3, **_shape(24, 1536, 16)),
    # Table 2.1 lists 24 heads of width 128 for 1.3B, which does not tile d 2048; 16 heads
    # of 128 (as in Megatron-LM's and GPT-Neo's 1.3B) keeps the published head width.
    "gpt3-1.3b": dict(_GPT3, **_shape(24, 2048, 16)),
    "gpt3-2.7b": dict(_GPT3, **_shape(32, 2560, 32)),
    "gpt3-6.7b": dict(_GPT3, **_shape(32, 4096, 32)),
    # Table 2.1 lists d_model 5140, which 40 heads do not divide; 5120 (= 40 × 128) is what
    # every reproduction uses.
    "gpt3-13b": dict(_GPT3, **_shape(40, 5120, 40)),
    "gpt3-175b": dict(_GPT3, **_shape(96, 12288, 96)),
    "llama-7b": dict(_LLAMA, d_ff=11008, **_shape(32, 4096, 32)),
    "llama-13b": dict(_LLAMA, d_ff=13824, **_shape(40, 5120, 40)),
    "llama-33b": dict(_LLAMA, d_ff=17920, **_shape(60, 6656, 52)),
    "llama-65b": dict(_LLAMA, d_ff=22016, **_shape(80, 8192, 64)),
    "llama2-7b": dict(_LLAMA2, d_ff=11008, **_shape(32, 4096, 32)),
    "llama2-13b": dict(_LLAMA2, d_ff=13824, **_shape(40, 5120, 40)),
    "llama2-70b": dict(_LLAMA2, d_ff=28672, n_kv_heads=8, **_shape(80, 8192, 64)),
    # Tiny BERT for CPU tests and the demo (the tiny GPT's shape, no dropout).
    "bert-tiny": dict(_BERT, vocab_size=512, max_seq_len=128, dropout=0.0) | _shape(2, 64, 4),
    "bert-base": dict(_BERT, **_shape(12, 768, 12)),
    "bert-large": dict(_BERT, **_shape(24, 1024, 16)),
}

PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**raw) for name, raw in _RAW.items()}


def list_presets() -> list[str]:
    """Names of every preset, smallest families first."""
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset.

    Args:
        name: a preset name from :func:`list_presets`.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "see `crucible model list`"
        raise CrucibleError(f"unknown model preset {name!r}; {hint}")
    return PRESETS[name].model_copy(deep=True)
