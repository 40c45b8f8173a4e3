"""The GPT: one plain decoder-only transformer covering GPT-1/2/3 and LLaMA 1/2.

Pre-norm blocks of causal self-attention and an MLP (:mod:`crucible.model.layers`, shared
with the BERT encoder). Every option of :class:`ModelConfig` is a branch here: learned or rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU, MHA,
GQA or MQA (``n_kv_heads``), biases, tied embeddings, dropout. It knows nothing about
DeepSpeed, Ray or parallelism: :mod:`crucible.model.parallelize` wraps it.

Build large models on the meta device (``build_model(cfg, device="meta")``), then
materialise with :func:`init_weights` (or shard first under ZeRO-3, see parallelize).
Decoding passes a :class:`~crucible.model.kv_cache.KVCache` to ``forward``; without one
(training) attention is SDPA's causal kernel and nothing else changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from crucible.model.config import ModelConfig
from crucible.model.layers import (
    MLP,
    Attention,
    apply_rotary,
    build_norm,
    flex_attention,
    rotary_cos_sin,
)

if TYPE_CHECKING:
    from crucible.model.kv_cache import KVCache, LayerCache

__all__ = [
    "GPT",
    "MLP",
    "Attention",
    "Block",
    "apply_rotary",
    "build_model",
    "document_mask",
    "flex_attention",
    "init_parameter",
    "init_weights",
    "model_class",
    "rotary_cos_sin",
]  # fmt: skip


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = build_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = build_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | BlockMask | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    ``forward(tokens, targets=None, doc_ids=None, cache=None, positions=None)`` returns
    ``(logits, loss)``; ``loss`` is the mean cross-entropy over targets that are not ``-100``,
    or ``None`` without targets.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.flex_attention: bool | None = None
        """Document masks through flex attention (True), a dense SDPA mask (False), or
        flex on CUDA and dense elsewhere (None)."""
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] for ``tokens`` [B, T], and the loss against ``targets`` [B, T].

        Args:
            tokens: token ids, int64 [B, T] with T <= max_seq_len.
            targets: next-token ids [B, T]; -100 marks positions left out of the loss.
            doc_ids: see :meth:`hidden`.
            cache: see :meth:`hidden`.
            positions: see :meth:`hidden`.
        """
        logits = self.lm_head(self.hidden(tokens, doc_ids, cache, positions))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def hidden(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normalised hidden states [B, T, d_model] of ``tokens`` [B, T].

        Args:
            tokens: token ids, int64 [B, T] with T <= max_seq_len.
            doc_ids: optional [B, T] document number of each token in a packed sequence;
                attention then stays inside each document (block-diagonal causal mask).
            cache: keys and values of the positions before ``tokens`` (decoding, see
                :mod:`crucible.model.kv_cache`); ``tokens`` continue every row, and the
                cache gives their positions and attention mask.
            positions: optional [B, T] position of each token (packed examples restart at 0);
                default 0..T-1.
        """
        T = tokens.shape[1]
        mask: torch.Tensor | BlockMask | None = None
        if cache is None:
            if self.cfg.max_seq_len < T:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
            if positions is None:
                positions = torch.arange(T, device=tokens.device)
        elif doc_ids is not None or positions is not None:
            raise ValueError("doc_ids or positions and a KV cache cannot be combined")
        else:
            positions, mask = cache.extend(T)
        x = self.tok_emb(tokens)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rotary_cos_sin(self.cfg, positions, x.dtype)
        x = self.dropout(x)
        if doc_ids is not None:
            flex = self.flex_attention
            if flex is None:
                flex = tokens.device.type == "cuda"
            if self.training and self.cfg.dropout > 0:
                flex = False  # flex attention has no attention dropout
            mask = document_mask(doc_ids, flex)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if cache is None else cache.layers[i])
        return self.norm_f(x)


def document_mask(doc_ids: torch.Tensor, flex: bool) -> torch.Tensor | BlockMask:
    """Causal attention within each document of packed rows: a flex-attention block mask
    (blocks that cross no document are skipped, no [T, T] tensor) or a dense [B, 1, T, T] one.

    Args:
        doc_ids: [B, T] document number of each token.
        flex: build a :class:`BlockMask` for :func:`flex_attention`.
    """
    B, T = doc_ids.shape
    if flex:

        def same_doc_causal(
            b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
        ) -> torch.Tensor:
            return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)

        return create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def model_class(cfg: ModelConfig) -> type[GPT]:
    """The module a shape builds: :class:`GPT`, or :class:`~crucible.model.bert.Bert` for
    ``arch: bert`` (typed as GPT: it takes the same ``forward`` arguments and returns the
    same ``(logits, loss)``).

    Args:
        cfg: the model shape.
    """
    if cfg.arch == "bert":
        from crucible.model.bert import Bert

        return Bert  # type: ignore[return-value]
    return GPT


def build_model(
    cfg: ModelConfig,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    cls: type[GPT] | None = None,
) -> GPT:
    """Construct a :class:`GPT` on ``device`` without initialising it.

    On ``"meta"`` no memory is allocated (a 175B model builds in seconds); call
    :func:`init_weights` to materialise. On a real device the weights hold torch's default
    init until :func:`init_weights` runs.

    Args:
        cfg: the model shape.
        device: where parameters are created; "meta" allocates nothing.
        dtype: parameter dtype (default: torch's default dtype).
        cls: the class to build (default :func:`model_class`; e.g. the reward model).
    """
    with torch.device(device):
        model = (cls or model_class(cfg))(cfg)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def init_parameter(name: str, param: torch.Tensor, cfg: ModelConfig, gen: torch.Generator) -> None:
    """GPT-2/3 initialisation of one parameter, by name, in place.

    Normal(0, init_std) for weights and embeddings; residual output projections scaled by
    1/sqrt(2·n_layers) (GPT-2 §2.3) so the residual stream's variance does not grow with
    depth (pre-norm decoders only: BERT's post-norm blocks renormalise the stream); zeros
    for biases; ones for norm scales (every module whose name starts with ``norm``).

    Args:
        name: the parameter's name in ``named_parameters()`` of the model.
        param: the tensor to fill.
        cfg: the model shape (for init_std and n_layers).
        gen: random generator on ``param``'s device.
    """
    module = name.rsplit(".", 2)[-2] if name.count(".") else ""
    with torch.no_grad():
        if module.startswith("norm"):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            std = cfg.init_std
            if cfg.arch == "gpt" and name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                std /= math.sqrt(2 * cfg.n_layers)
            param.normal_(0.0, std, generator=gen)


def init_weights(model: GPT, seed: int = 0, device: str | torch.device | None = None) -> GPT:
    """Materialise (if on meta) and initialise every parameter of ``model`` reproducibly.

    Args:
        model: a :class:`GPT`, possibly on the meta device.
        seed: the same seed gives the same weights on the same device type.
        device: where to materialise a meta model (default "cpu"); ignored otherwise.
    """
    from crucible.model.bert import Bert

    first = next(model.parameters())
    if first.is_meta:
        model.to_empty(device=device or "cpu")
        if isinstance(model, Bert):  # to_empty unties shared tables
            model.tie_weights()
        elif model.cfg.tie_embeddings and hasattr(model, "lm_head"):
            model.lm_head.weight = model.tok_emb.weight
        first = next(model.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    # named_parameters() yields a tied weight once, under tok_emb.
    for name, p in model.named_parameters():
        init_parameter(name, p, model.cfg, gen)
    return model
