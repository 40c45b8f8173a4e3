"""Parameter, FLOP and memory arithmetic for a :class:`ModelConfig`, without building it.

The planner and the monitor use these functions; nothing else recomputes them. Every count
here equals what the instantiated :class:`crucible.model.gpt.GPT` holds (tests check it for
every preset and for random option combinations).
"""

from __future__ import annotations

from crucible.model.config import ModelConfig


def _layer_shapes(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of each leaf module of one transformer block (weights + biases)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    b = int(cfg.bias)
    qkv_out = (cfg.n_heads + 2 * cfg.kv_heads) * hd
    shapes = {
        "norm1": d * (2 if cfg.norm == "layernorm" and cfg.bias else 1),
        "attn.qkv": d * qkv_out + b * qkv_out,
        "attn.proj": cfg.n_heads * hd * d + b * d,
        "mlp.proj": f * d + b * d,
    }
    shapes["norm2"] = shapes["norm1"]
    if cfg.mlp == "swiglu":
        shapes["mlp.gate"] = shapes["mlp.up"] = d * f + b * f
    else:
        shapes["mlp.fc"] = d * f + b * f
    return shapes


def _embedding_params(cfg: ModelConfig) -> int:
    """Lookup tables: token embedding plus learned positions (and BERT's token types); no
    matmul FLOPs."""
    types = cfg.type_vocab_size * cfg.d_model if cfg.arch == "bert" else 0
    return (
        cfg.vocab_size * cfg.d_model
        + (cfg.max_seq_len * cfg.d_model if cfg.pos == "learned" else 0)
        + types
    )


def _bert_heads(cfg: ModelConfig) -> int:
    """BERT's parameters besides the tables and blocks: the embedding LayerNorm, the pooler,
    the masked-LM head (dense, LayerNorm, decoder bias; its weight is the token table) and
    the next-sentence classifier."""
    d = cfg.d_model
    return 2 * d + (d * d + d) + (d * d + d + 2 * d + cfg.vocab_size) + (2 * d + 2)


def num_params(cfg: ModelConfig) -> int:
    """Total trainable parameters; a tied embedding/output matrix counts once.

    Args:
        cfg: the model shape.
    """
    per_layer = sum(_layer_shapes(cfg).values())
    if cfg.arch == "bert":
        return _embedding_params(cfg) + cfg.n_layers * per_layer + _bert_heads(cfg)
    final_norm = _layer_shapes(cfg)["norm1"]
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return _embedding_params(cfg) + cfg.n_layers * per_layer + final_norm + head


def num_non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters outside the token and position tables (Kaplan et al. 2020's N).

    A separate (untied) output projection counts here; a tied one is the embedding.

    Args:
        cfg: the model shape.
    """
    return num_params(cfg) - _embedding_params(cfg)


def num_matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token: all but the lookup tables, plus the output
    projection even when it is tied to the token embedding (it is still a d×V matmul).

    Args:
        cfg: the model shape.
    """
    return num_non_embedding_params(cfg) + (
        cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    )


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token for MFU: 6·N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, app. B).

    N is :func:`num_matmul_params`: PaLM's non-embedding count (lookups cost no FLOPs) with the
    output projection included, as torchtitan counts it (6·(params − token embedding)). The
    attention term counts the full T×T score matrix, causal masking notwithstanding, as
    PaLM does. No recomputation: this is the "model FLOPs" of MFU.

    Args:
        cfg: the model shape.
        seq_len: training sequence length T.
    """
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * num_matmul_params(cfg) + attn)


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int, recompute: bool = True) -> float:
    """FLOPs the hardware actually executes per token: model FLOPs plus, with full activation
    recomputation, one more forward (2·N + 4·L·H·Q·T), i.e. 8·N + 16·L·H·Q·T.

    Megatron-LM's published TFLOP/s use this count (8·N·T per token with recomputation).

    Args:
        cfg: the model shape.
        seq_len: training sequence length T.
        recompute: whether every block's forward runs twice (activation checkpointing).
    """
    flops = model_flops_per_token(cfg, seq_len)
    if recompute:
        flops += (
            2 * num_matmul_params(cfg) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
        )
    return flops


def model_state_bytes(cfg: ModelConfig, precision: str = "bf16") -> dict[str, int]:
    """Bytes of weights, gradients and Adam states for the whole (unsharded) model.

    bf16 mixed precision: bf16 weights (2) and grads (2), fp32 master weights (4) and Adam
    m, v (4 + 4): 16 bytes/param, the ZeRO paper's 2Ψ + 2Ψ + KΨ with K = 12. fp32: 4-byte
    weights and grads, Adam m, v, no master copy: also 16. Divide by the data-parallel size
    for ZeRO-3's per-rank share.

    Args:
        cfg: the model shape.
        precision: "bf16" (mixed) or "fp32".
    """
    n = num_params(cfg)
    if precision == "bf16":
        parts = {
            "weights": 2 * n,
            "grads": 2 * n,
            "master": 4 * n,
            "adam_m": 4 * n,
            "adam_v": 4 * n,
        }
    elif precision == "fp32":
        parts = {"weights": 4 * n, "grads": 4 * n, "master": 0, "adam_m": 4 * n, "adam_v": 4 * n}
    else:
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    parts["total"] = sum(parts.values())
    return parts


def largest_layer_params(cfg: ModelConfig) -> int:
    """Parameters of the largest single module, as DeepSpeed's ZeRO-3 memory estimator
    (``estimate_zero3_model_states_mem_needs``) defines it: the most parameters any one
    module owns directly (the embedding or output projection for every real preset).

    Args:
        cfg: the model shape.
    """
    vd = cfg.vocab_size * cfg.d_model
    if cfg.arch == "bert":
        vd += cfg.vocab_size  # the masked-LM decoder owns the tied table and its bias
    pos = cfg.max_seq_len * cfg.d_model if cfg.pos == "learned" else 0
    return max(vd, pos, *_layer_shapes(cfg).values())
