"""Converters between crucible's :class:`~crucible.model.bert.Bert` and Hugging Face's
``BertForPreTraining`` (the encoder with its masked-LM and next-sentence heads).

Names map one to one except the attention projections, which crucible fuses into one
``qkv`` matrix (query, key, value rows in that order) and Hugging Face keeps apart. The
masked-LM decoder's weight is the word embedding in both. :mod:`crucible.model.hf`
dispatches here for ``arch: bert``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig

if TYPE_CHECKING:
    from transformers import BertConfig, PretrainedConfig

StateDict = dict[str, torch.Tensor]

_TOP = {
    "tok_emb.weight": "bert.embeddings.word_embeddings.weight",
    "pos_emb.weight": "bert.embeddings.position_embeddings.weight",
    "type_emb.weight": "bert.embeddings.token_type_embeddings.weight",
    "norm_emb.weight": "bert.embeddings.LayerNorm.weight",
    "norm_emb.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "mlm.fc.weight": "cls.predictions.transform.dense.weight",
    "mlm.fc.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.decoder.bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}
_BLOCK = {
    "attn.proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "norm2": "output.LayerNorm",
}


def _key_map(cfg: ModelConfig) -> dict[str, str]:
    """crucible name -> Hugging Face name, for all but the fused qkv."""
    out = dict(_TOP)
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
    return out


def hf_bert_config(cfg: ModelConfig) -> BertConfig:
    """The ``BertConfig`` with the same shape as ``cfg``.

    Args:
        cfg: an ``arch: bert`` model shape.
    """
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act="gelu",  # the exact (erf) GELU, as crucible's BERT
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
    )


def config_from_hf_bert(hf: PretrainedConfig) -> ModelConfig:
    """The :class:`ModelConfig` of a ``BertConfig``.

    Args:
        hf: a Hugging Face BERT config.
    """
    if hf.hidden_act != "gelu":
        raise CrucibleError(f"BERT activation {hf.hidden_act!r} is not the exact GELU")
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise CrucibleError("BERT configs with relative position embeddings are unsupported")
    if hf.hidden_dropout_prob != hf.attention_probs_dropout_prob:
        raise CrucibleError("BERT configs need equal hidden and attention dropout")
    return ModelConfig(
        arch="bert",
        vocab_size=hf.vocab_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_model=hf.hidden_size,
        d_ff=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        dropout=hf.hidden_dropout_prob,
        norm_eps=hf.layer_norm_eps,
        init_std=hf.initializer_range,
    )


def bert_state_dict_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Rename (and split the fused qkv of) a crucible BERT state dict for
    ``BertForPreTraining``.

    Args:
        sd: ``Bert.state_dict()``.
        cfg: the model shape.
    """
    out = {theirs: sd[ours] for ours, theirs in _key_map(cfg).items() if ours in sd}
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            fused = sd.get(f"blocks.{i}.attn.qkv.{kind}")
            if fused is not None:
                base = f"bert.encoder.layer.{i}.attention.self"
                for name, part in zip(("query", "key", "value"), fused.chunk(3), strict=True):
                    out[f"{base}.{name}.{kind}"] = part.contiguous()
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def bert_state_dict_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Rename (and fuse q, k, v of) a ``BertForPreTraining`` state dict for crucible.

    Args:
        sd: the Hugging Face state dict (buffers are ignored).
        cfg: the model shape (e.g. from :func:`config_from_hf_bert`).
    """
    out = {ours: sd[theirs] for ours, theirs in _key_map(cfg).items() if theirs in sd}
    for i in range(cfg.n_layers):
        base = f"bert.encoder.layer.{i}.attention.self"
        for kind in ("weight", "bias"):
            parts = [sd.get(f"{base}.{name}.{kind}") for name in ("query", "key", "value")]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)  # type: ignore[arg-type]
    out["mlm.decoder.weight"] = out["tok_emb.weight"]
    return out
