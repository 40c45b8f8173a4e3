"""The shape of a GPT (:class:`ModelConfig`) and the ``model:`` section of a run spec
(:class:`ModelSpec`: a preset plus overrides, plus how to parallelise it,
:class:`ParallelSpec`, which :mod:`crucible.model.parallelize` applies).

Everything that cannot work (heads not dividing ``d_model``, ``n_kv_heads`` not dividing
``n_heads``, rotary with an odd head dim, an unknown preset) fails here, at spec validation,
with the offending field named, before any weight is allocated.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from crucible.config import StrictModel, validate
from crucible.errors import CrucibleError


def _field_error(
    model: str, field: str, value: Any, message: str, kind: str = "invalid_shape"
) -> ValidationError:
    # A model-level check that still reports the field it is about (pydantic would otherwise
    # put it at the root of the section).
    err = InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=value)
    return ValidationError.from_exception_data(model, [err])


class ParallelSpec(StrictModel):
    """How the model is sharded and wrapped (the ``model.parallel`` section of a spec)."""

    zero_stage: int = Field(default=3, ge=0, le=3, description="DeepSpeed ZeRO stage 0–3.")
    precision: Literal["bf16", "fp32"] = Field(
        default="bf16", description="bf16 mixed precision (fp32 master weights) or pure fp32."
    )
    overlap_comm: bool = Field(
        default=True, description="Overlap gradient reduction with backward."
    )
    contiguous_gradients: bool = Field(
        default=True, description="Copy gradients into one buffer to avoid fragmentation."
    )
    prefetch_bucket_size: int = Field(
        default=50_000_000, gt=0, description="ZeRO-3: parameters (elements) fetched ahead."
    )
    reduce_bucket_size: int = Field(
        default=500_000_000, gt=0, description="Elements reduced at once in gradient reduction."
    )
    param_persistence_threshold: int = Field(
        default=100_000, ge=0, description="ZeRO-3: parameters smaller than this stay unsharded."
    )
    max_live_parameters: int = Field(
        default=1_000_000_000, gt=0, description="ZeRO-3: most gathered parameters held at once."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none", description="Keep optimizer states (and step) in CPU memory."
    )
    offload_params: Literal["none", "cpu"] = Field(
        default="none", description="ZeRO-3: keep parameter shards in CPU memory."
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute each block's activations in backward."
    )
    compile: bool = Field(default=False, description="torch.compile each transformer block.")
    zero_hpz_partition_size: int = Field(
        default=1, ge=1, description="ZeRO++ hpZ: secondary weight shard group size (GPUs/node)."
    )
    zero_quantized_weights: bool = Field(
        default=False, description="ZeRO++ qwZ: int8-quantised weight all-gather."
    )
    zero_quantized_gradients: bool = Field(
        default=False, description="ZeRO++ qgZ: int4-quantised gradient reduce-scatter."
    )

    @model_validator(mode="after")
    def _check_stage(self) -> ParallelSpec:
        needs3 = {
            "offload_params": self.offload_params != "none",
            "zero_hpz_partition_size": self.zero_hpz_partition_size > 1,
            "zero_quantized_weights": self.zero_quantized_weights,
            "zero_quantized_gradients": self.zero_quantized_gradients,
        }
        for field, used in needs3.items():
            if used and self.zero_stage != 3:
                value = getattr(self, field)
                raise _field_error(
                    "ParallelSpec",
                    field,
                    value,
                    f"needs zero_stage 3 (got {self.zero_stage})",
                    kind="parallel",
                )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise _field_error(
                "ParallelSpec",
                "offload_optimizer",
                self.offload_optimizer,
                "needs zero_stage 1, 2 or 3",
                kind="parallel",
            )
        return self


class ModelConfig(StrictModel):
    """The complete shape of a decoder-only transformer; every option of :class:`GPT`."""

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

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise _field_error(
                "ModelConfig",
                "n_heads",
                self.n_heads,
                f"n_heads must divide d_model ({self.d_model}); pick a divisor of it",
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise _field_error(
                "ModelConfig",
                "n_kv_heads",
                self.n_kv_heads,
                f"n_kv_heads must divide n_heads ({self.n_heads})",
            )
        if self.pos == "rotary" and self.head_dim % 2:
            raise _field_error(
                "ModelConfig",
                "pos",
                self.pos,
                f"rotary needs an even head dim, d_model/n_heads is {self.head_dim}",
            )
        return self

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


# Every ModelConfig field, optional: a spec names a preset and overrides only what it changes.
_Overrides: Any = create_model(  # type: ignore[call-overload]
    "_Overrides",
    __base__=StrictModel,
    **{
        name: (f.annotation | None, Field(default=None, description=f.description))  # type: ignore[operator]
        for name, f in ModelConfig.model_fields.items()
    },
)


class ModelSpec(_Overrides):  # type: ignore[misc, valid-type]
    """The ``model:`` section of a run spec: a preset, overrides of its fields, parallelism."""

    preset: str | None = Field(
        default=None, description="Named shape (see `crucible model list`); None: give all fields."
    )
    parallel: ParallelSpec = Field(
        default_factory=ParallelSpec, description="How the model is sharded and wrapped."
    )

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, v: str | None) -> str | None:
        from crucible.model.presets import PRESETS

        if v is not None and v not in PRESETS:
            close = difflib.get_close_matches(v, list(PRESETS), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else "see `crucible model list`"
            raise ValueError(f"unknown preset; {hint}")
        return v

    @model_validator(mode="after")
    def _check_resolves(self) -> ModelSpec:
        try:
            ModelConfig.model_validate(self._merged())
        except ValidationError as e:
            # Re-raise with the same field locations, so the error path reads model.<field>.
            details = [
                InitErrorDetails(
                    type=PydanticCustomError(err["type"], err["msg"].replace("{", "(")),
                    loc=err["loc"],
                    input=err.get("input"),
                )
                for err in e.errors()
            ]
            raise ValidationError.from_exception_data("ModelSpec", details) from None
        return self

    def _merged(self) -> dict[str, Any]:
        from crucible.model.presets import PRESETS

        base = PRESETS[self.preset].model_dump() if self.preset is not None else {}
        for name in ModelConfig.model_fields:
            value = getattr(self, name)
            if value is not None:
                base[name] = value
        return base

    def resolve(self) -> ModelConfig:
        """The complete :class:`ModelConfig`: the preset with this spec's overrides applied."""
        return validate(ModelConfig, self._merged(), source="model")


def resolve_model(data: dict[str, Any] | str, source: str = "model") -> ModelConfig:
    """A :class:`ModelConfig` from a preset name or a ``model:`` mapping.

    Args:
        data: a preset name, or a mapping in the shape of :class:`ModelSpec`.
        source: where ``data`` came from, for error messages.
    """
    if isinstance(data, str):
        data = {"preset": data}
    if not isinstance(data, dict):
        raise CrucibleError(f"{source}: expected a preset name or a mapping of model fields")
    return validate(ModelSpec, data, source=source).resolve()
