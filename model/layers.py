"""The transformer's parts that the decoder (:mod:`crucible.model.gpt`) and the encoder
(:mod:`crucible.model.bert`) share: norms, rotary positions, self-attention (SDPA, or flex
attention under a block mask) and the MLP. Every option is a field of
:class:`~crucible.model.config.ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from crucible.model.config import ModelConfig

if TYPE_CHECKING:
    from crucible.model.kv_cache import LayerCache


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The norm layer of ``cfg``: RMSNorm, or LayerNorm (with a bias if ``cfg.bias``)."""
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
