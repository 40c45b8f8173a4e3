"""The ``model:`` section of a run spec: :class:`ModelSpec` (a preset plus overrides of its
:class:`~crucible.model.config.ModelConfig` fields) and :class:`ParallelSpec` (how the model is
sharded and wrapped, which :mod:`crucible.model.parallelize` applies).

An unknown preset, or overrides that give an impossible shape, fail at spec validation with
the offending field named.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from crucible.config import StrictModel, field_error, validate
from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig
from crucible.model.presets import PRESETS


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
                raise field_error(
                    "ParallelSpec",
                    field,
                    value,
                    f"needs zero_stage 3 (got {self.zero_stage})",
                    kind="parallel",
                )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise field_error(
                "ParallelSpec",
                "offload_optimizer",
                self.offload_optimizer,
                "needs zero_stage 1, 2 or 3",
                kind="parallel",
            )
        return self


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
