"""The shape of a GPT: :class:`ModelConfig`, every option of :class:`crucible.model.gpt.GPT`.

Everything that cannot work (heads not dividing ``d_model``, ``n_kv_heads`` not dividing
``n_heads``, rotary with an odd head dim) fails here, at spec validation, with the offending
field named, before any weight is allocated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crucible.config import StrictModel, field_error


class ModelConfig(StrictModel):
    """The complete shape of a transformer: every option of :class:`GPT` (decoder) and of
    :class:`~crucible.model.bert.Bert` (encoder)."""

    arch: Literal["gpt", "bert"] = Field(
        default="gpt",
        description="gpt: decoder (causal, pre-norm); bert: encoder (bidirectional, post-norm, "
        "token types, masked-LM and next-sentence heads).",
    )
    vocab_size: int = Field(gt=0, description="Number of token ids (embedding rows).")
    n_layers: int = Field(gt=0, description="Number of transformer blocks.")
    n_heads: int = Field(gt=0, description="Number of query heads per attention layer.")
    n_kv_heads: int | None = Field(
        default=None, gt=0, description="Key/value heads (GQA/MQA); None means n_heads (MHA)."
    )
    d_model: int = Field(gt=0, description="Width of the residual stream.")
    d_ff: int | None = Field(
        default=None,
        gt=0,
        description="Hidden width of the MLP; None means 4·d_model (GELU) or LLaMA's 8/3·d (SwiGLU).",
    )
    max_seq_len: int = Field(gt=0, description="Longest sequence (context length) supported.")
    pos: Literal["learned", "rotary"] = Field(
        default="learned", description="Position encoding: learned table or rotary (RoPE)."
    )
    norm: Literal["layernorm", "rmsnorm"] = Field(
        default="layernorm", description="Normalisation layer used before each sublayer."
    )
    mlp: Literal["gelu", "swiglu"] = Field(
        default="gelu", description="MLP kind: GELU (GPT) or SwiGLU (LLaMA)."
    )
    bias: bool = Field(default=True, description="Biases in linear and norm layers.")
    tie_embeddings: bool = Field(
        default=True, description="Share the token embedding with the output projection."
    )
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and MLP."
    )
    rope_theta: float = Field(default=10000.0, gt=0, description="Rotary base frequency.")
    norm_eps: float = Field(default=1e-5, gt=0, description="Epsilon of the norm layers.")
    init_std: float = Field(default=0.02, gt=0, description="Std of the normal weight init.")
    type_vocab_size: int = Field(
        default=2, gt=0, description="bert: token types (segments A and B of next-sentence pairs)."
    )

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise field_error(
                "ModelConfig",
                "n_heads",
                self.n_heads,
                f"n_heads must divide d_model ({self.d_model}); pick a divisor of it",
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise field_error(
                "ModelConfig",
                "n_kv_heads",
                self.n_kv_heads,
                f"n_kv_heads must divide n_heads ({self.n_heads})",
            )
        if self.pos == "rotary" and self.head_dim % 2:
            raise field_error(
                "ModelConfig",
                "pos",
                self.pos,
                f"rotary needs an even head dim, d_model/n_heads is {self.head_dim}",
            )
        if self.arch == "bert":
            wants = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
            wants["tie_embeddings"] = True
            for field, value in wants.items():
                if getattr(self, field) != value:
                    raise field_error(
                        "ModelConfig", field, getattr(self, field), f"arch bert needs {value}"
                    )
            if self.n_kv_heads not in (None, self.n_heads):
                raise field_error(
                    "ModelConfig", "n_kv_heads", self.n_kv_heads, "arch bert has no grouped K/V"
                )
        return self

    @property
    def causal(self) -> bool:
        """Whether a position attends only to itself and those before it (decoders)."""
        return self.arch == "gpt"

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually used."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP actually used."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        # LLaMA: 2/3 of 4d, rounded up to a multiple of 256 (keeps SwiGLU's FLOPs at GELU's).
        hidden = int(2 * 4 * self.d_model / 3)
        return 256 * ((hidden + 255) // 256)
