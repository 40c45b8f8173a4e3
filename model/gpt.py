"""The GPT: one plain decoder-only transformer covering GPT-1/2/3 and LLaMA 1/2.

Pre-norm blocks of causal self-attention and an MLP. Every option of :class:`ModelConfig`
is a branch here: learned or rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU, MHA,
GQA or MQA (``n_kv_heads``), biases, tied embeddings, dropout. It knows nothing about
DeepSpeed, Ray or parallelism: :mod:`crucible.model.parallelize` wraps it.

Build large models on the meta device (``build_model(cfg, device="meta")``), then
materialise with :func:`init_weights` (or shard first under ZeRO-3, see parallelize).
Decoding passes a :class:`~crucible.model.kv_cache.KVCache` to ``forward``; without one
(training) attention is SDPA's causal kernel and nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from crucible.model.config import ModelConfig

if TYPE_CHECKING:
    from crucible.model.kv_cache import KVCache, LayerCache


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_cos_sin(
    cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary positions, split-halves layout: [T, head_dim] for positions
    [T], or [B, 1, T, head_dim] (broadcast over heads) for per-row positions [B, T].

    Computed in fp32 and cast, as Hugging Face's Llama does, so converted weights give the
    same logits. Recomputed per forward: cheap, and nothing to re-initialise after meta.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, hd, 2, device=positions.device).float() / hd)
    )
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    if positions.dim() == 2:
        emb = emb[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by position; the first and second halves of D pair up."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Self-attention, causal for decoders; ``n_kv_heads < n_heads`` shares each K/V head
    across a group."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd, q, kv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        # One fused projection for q, k, v: fewer, larger matmuls.
        self.qkv = nn.Linear(cfg.d_model, (q + 2 * kv) * hd, bias=cfg.bias)
        self.proj = nn.Linear(q * hd, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | BlockMask | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd, nq, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.kv_heads
        q, k, v = self.qkv(x).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nq, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            # Store this step's keys and values, kv_heads wide; attend over the cache's slots.
            k, v = cache.update(k, v)
        if isinstance(mask, BlockMask):  # grouped K/V heads natively, no repeat
            y = flex_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, nq * hd)
            return self.resid_dropout(self.proj(y))
        if nkv != nq:
            # Query head h uses K/V head h // (nq/nkv), as in Hugging Face's repeat_kv.
            k = k.repeat_interleave(nq // nkv, dim=1)
            v = v.repeat_interleave(nq // nkv, dim=1)
        # Without a document mask, is_causal lets SDPA pick flash / memory-efficient kernels.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and self.cfg.causal,
            dropout_p=self.cfg.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, T, nq * hd)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GELU MLP (GPT: fc → gelu → proj) or SwiGLU (LLaMA: down(silu(gate) · up))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # GPT-2's "gelu_new" is the tanh approximation; BERT's is the exact (erf) GELU.
        self.approximate = "tanh" if cfg.arch == "gpt" else "none"
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
            self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.fc(x), approximate=self.approximate)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg)
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
        self.norm_f = _norm(cfg)
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


_compiled_flex: Callable[..., torch.Tensor] | None = None


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask
) -> torch.Tensor:
    """torch's flex attention under ``block_mask``; compiled on CUDA (its fast path), eager
    elsewhere (a reference implementation, for tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    gqa = k.shape[1] != q.shape[1]
    if q.device.type != "cuda":
        out = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    else:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        out = _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    assert isinstance(out, torch.Tensor)
    return out


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
