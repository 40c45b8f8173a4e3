"""BERT (Devlin et al. 2018): a bidirectional transformer encoder trained by masked language
modelling and, in the original recipe, next-sentence prediction.

Built from the GPT's attention and MLP (:mod:`crucible.model.layers`) with what BERT does
differently: no causal mask, post-norm blocks (``x = norm(x + sublayer(x))``), token-type
embeddings added to the token and learned position ones and normalised, the exact (erf)
GELU, and three heads: the masked-LM head (dense → GELU → LayerNorm → a decoder tied to the
token embedding, with its own bias), the pooler (dense + tanh on the [CLS] position) and the
next-sentence classifier on the pooler. Parameter counts equal Hugging Face's
``BertForPreTraining`` for the same config; :mod:`crucible.model.hf` converts both ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from crucible.model.config import ModelConfig
from crucible.model.layers import MLP, Attention, build_norm

if TYPE_CHECKING:
    from crucible.model.kv_cache import KVCache

IGNORE = -100


class EncoderBlock(nn.Module):
    """Post-norm block: x = norm1(x + attn(x)), then x = norm2(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = build_norm(cfg)
        self.mlp = MLP(cfg)
        self.norm2 = build_norm(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, rope, mask))
        return self.norm2(x + self.mlp(x))


class MaskedLMHead(nn.Module):
    """dense → GELU → LayerNorm → vocabulary logits; the decoder's weight is the token
    embedding (tied by :class:`Bert`), its bias is the head's own."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = build_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.fc(h))))


class Bert(nn.Module):
    """BERT encoder with its pre-training heads.

    ``forward(tokens, targets, doc_ids, token_types=..., nsp_labels=...)`` returns
    ``(logits, loss)`` as the GPT's does, so one training loop runs both: ``targets`` hold
    the original ids at masked positions and -100 elsewhere; with targets, ``logits`` are
    those of the masked positions only ([N, V], in row-major order: the decoder runs on them
    alone, as the loss needs nothing else), and the loss is the masked-LM cross-entropy plus,
    with ``nsp_labels``, the next-sentence one (``BertForPreTraining``'s sum).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "bert":
            raise ValueError(f"Bert needs model.arch bert, got {cfg.arch}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm_emb = build_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm = MaskedLMHead(cfg)
        self.nsp = nn.Linear(cfg.d_model, 2)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the masked-LM decoder (again after ``to_empty``)."""
        self.mlm.decoder.weight = self.tok_emb.weight

    def hidden(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's hidden states [B, T, d_model] of ``tokens`` [B, T].

        Args:
            tokens: token ids, int64 [B, T] with T <= max_seq_len.
            token_types: segment of each token (0 or 1) [B, T]; default all 0.
            doc_ids: optional [B, T] group of each token: a token attends only to tokens of
                its group (-1 marks padding, which then attends only to padding).
            positions: optional [B, T] positions; default 0..T-1.
        """
        T = tokens.shape[1]
        if self.cfg.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        x = self.tok_emb(tokens) + self.pos_emb(positions) + self.type_emb(token_types)
        x = self.dropout(self.norm_emb(x))
        mask = None
        if doc_ids is not None:
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        for block in self.blocks:
            x = block(x, None, mask)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        nsp_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked-LM logits and the pre-training loss (see the class docstring).

        Args:
            tokens: token ids [B, T].
            targets: original ids at masked positions, -100 elsewhere [B, T].
            doc_ids: see :meth:`hidden`.
            cache: not supported (an encoder does not decode); must be None.
            positions: see :meth:`hidden`.
            token_types: see :meth:`hidden`.
            nsp_labels: [B] 0 when segment B follows segment A, 1 when it is random.
        """
        if cache is not None:
            raise ValueError("BERT is an encoder: it has no KV cache and does not generate")
        h = self.hidden(tokens, token_types, doc_ids, positions)
        if targets is None:
            return self.mlm(h), None
        picked = targets != IGNORE
        logits = self.mlm(h[picked])
        # a micro-batch without masked tokens (padding rows of an evaluation) still backprops
        loss = (
            F.cross_entropy(logits.float(), targets[picked], reduction="sum")
            / picked.sum().clamp(min=1)
            + logits.sum() * 0.0
        )
        if nsp_labels is not None:
            nsp_logits = self.nsp(torch.tanh(self.pooler(h[:, 0])))
            valid = nsp_labels != IGNORE
            nsp_loss = F.cross_entropy(
                nsp_logits.float(), nsp_labels, ignore_index=IGNORE, reduction="sum"
            )
            loss = loss + nsp_loss / valid.sum().clamp(min=1)
        return logits, loss

    def predict(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked-LM logits [B, T, V], next-sentence logits [B, 2])``: what Hugging Face's
        ``BertForPreTraining`` returns as ``prediction_logits`` and ``seq_relationship_logits``.

        Args:
            tokens: token ids [B, T].
            token_types: see :meth:`hidden`.
            doc_ids: see :meth:`hidden`.
        """
        h = self.hidden(tokens, token_types, doc_ids)
        return self.mlm(h), self.nsp(torch.tanh(self.pooler(h[:, 0])))
