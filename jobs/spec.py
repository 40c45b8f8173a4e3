"""The job spec: one YAML file per run, parsed into typed, strict sections.

Sections belong to the folders that use them (``cluster`` to ``crucible.cluster``, ...);
this module only composes them and handles loading, overrides and the resolved copy that is
saved with each run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from crucible.cluster.spec import ClusterSpec
from crucible.cluster.storage import Location
from crucible.config import (
    StrictModel,
    apply_overrides,
    field_error,
    load_yaml,
    spec_hash,
    validate,
)
from crucible.data_pipeline.spec import DataSpec
from crucible.errors import CrucibleError
from crucible.jobs.finetune.spec import BaseSpec, LoraSpec
from crucible.jobs.rlhf.spec import (
    FrozenSpec,
    PolicyDataSpec,
    PPOCheckpointSpec,
    PPOOptimSpec,
    PPOSpec,
    PPOWorkersSpec,
    RolloutSpec,
    SamplingSpec,
)
from crucible.jobs.train.spec import (
    CheckpointSpec,
    MonitoringSpec,
    ObjectiveSpec,
    OptimSpec,
    TrainDataSpec,
    TrainSpec,
)
from crucible.model.spec import ModelSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class _RunBase(StrictModel):
    """What every run has: its kind, a stable name, and where it runs."""

    name: str = Field(description="Stable run name; the run directory is <storage>/<name>.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Where it runs.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "use letters, digits, '.', '_' or '-' (at most 100, not starting with a dot)"
            )
        return v


class DataRunSpec(_RunBase):
    """A data job: raw text to clean documents and training shards."""

    kind: Literal["data"] = Field(description="The job to run.")
    data: DataSpec = Field(description="Inputs, filters, dedup and shards.")


class TrainRunSpec(_RunBase):
    """A train job: a GPT (or BERT) trained with DeepSpeed ZeRO-3 on Ray Train workers."""

    kind: Literal["train"] = Field(description="The job to run.")
    model: ModelSpec = Field(description="The GPT to train and how it is sharded.")
    data: TrainDataSpec = Field(description="The training shards and their order.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and schedule.")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpoint frequency and retention."
    )
    train: TrainSpec = Field(description="Workers and the training budget.")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="Next-token (GPT) or masked-LM (BERT)."
    )
    monitoring: MonitoringSpec = Field(
        default_factory=MonitoringSpec, description="Loggers besides Prometheus."
    )

    @model_validator(mode="after")
    def _objective_fits_model(self) -> TrainRunSpec:
        arch = self.model.resolve().arch
        if (arch == "bert") != (self.objective.kind == "mlm"):
            wants = "mlm" if arch == "bert" else "clm"
            raise field_error("TrainRunSpec", "objective", self.objective.kind,
                              f"model arch {arch} trains with objective.kind {wants}")  # fmt: skip
        if arch == "bert":
            if self.kind != "train":
                raise ValueError(f"kind: {self.kind} needs a GPT; BERT trains with kind: train")
            if self.train.eval_prompts is not None:
                raise ValueError("train.eval_prompts needs a generating model; BERT's held-out "
                                 "evaluation is its masked-token accuracy")  # fmt: skip
            if self.data.mask_cross_document:
                raise ValueError("data.mask_cross_document is for decoders: the segments of a "
                                 "masked-LM row attend to each other")  # fmt: skip
        return self


class FinetuneRunSpec(TrainRunSpec):
    """A finetune job: the train job started from ``base``'s weights, on chat shards (a data
    run with ``reader.chat``), fully or with LoRA adapters.

    ``model`` may give only ``parallel``: the shape is the base's (filled in at submission,
    so the resolved spec names every field); a shape that differs from the base's is refused.
    """

    kind: Literal["finetune"] = Field(description="The job to run.")  # type: ignore[assignment]
    base: BaseSpec = Field(description="The model fine-tuning starts from.")
    lora: LoraSpec | None = Field(
        None, description="Train LoRA adapters on a frozen base; null: full fine-tuning."
    )
    data: TrainDataSpec = Field(
        description="The chat shards (mask_cross_document defaults to true here)."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        d = data.get("data")
        if isinstance(d, dict) and "mask_cross_document" not in d:
            data["data"] = {**d, "mask_cross_document": True}
        model = data.get("model")
        base = data.get("base")
        if (model is None or set(model) <= {"parallel"}) and isinstance(base, dict):
            from crucible.jobs.finetune.base import base_config

            shape = base_config(validate(BaseSpec, base, source="base")).model_dump()
            data["model"] = {**(model or {}), **shape}
        return data


class RewardRunSpec(FinetuneRunSpec):
    """A reward job: a reward model (the base's trunk, a scalar head) trained on comparison
    shards (a data run with ``reader.chat.comparisons``), with InstructGPT's ranking loss;
    held-out loss and accuracy (pairs ordered right) at every evaluation."""

    kind: Literal["reward"] = Field(description="The job to run.")  # type: ignore[assignment]
    data: TrainDataSpec = Field(
        description="The comparison shards (mask_cross_document defaults to true here)."
    )

    @model_validator(mode="after")
    def _full(self) -> RewardRunSpec:
        if self.lora is not None:
            raise ValueError("lora is not supported for kind: reward; train it fully")
        if self.train.eval_prompts is not None:
            raise ValueError("train.eval_prompts is for language models; a reward model's "
                             "evaluation is its held-out accuracy")  # fmt: skip
        if not self.data.mask_cross_document:
            raise ValueError("a reward model scores each answer alone: keep "
                             "data.mask_cross_document true")  # fmt: skip
        return self


class RejectionSamplingRunSpec(_RunBase):
    """A rejection-sampling job (Llama 2-Chat): K answers to each prompt from ``policy``,
    scored by ``reward``, the best kept as fine-tuning data (``best.jsonl``)."""

    kind: Literal["rejection-sampling"] = Field(description="The job to run.")
    policy: str = Field(
        description="The policy: a chat fine-tuned run or checkpoint (path or URI)."
    )
    reward: str = Field(description="The reward model: a kind: reward run or checkpoint.")
    prompts: list[str] = Field(
        min_length=1,
        description="JSONL files of prompts: {prompt (, system)} or {messages} records.",
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How to sample.")
    num_workers: int = Field(1, ge=1, description="Ray tasks sharing the prompt batches.")
    use_gpu: bool | None = Field(
        None, description="One GPU per worker; null: if the cluster has GPUs."
    )


class PPORunSpec(_RunBase):
    """A PPO job (InstructGPT's RLHF step): the policy trained against ``reward``'s scores
    with a per-token KL penalty to its starting weights, by a value model started from the
    reward model's (as InstructGPT's was). The run's checkpoints hold the policy as a train
    run's do (generate, eval and export read them), and the value model beside it.

    ``model`` may give only ``parallel``: the shape is the policy's; ``data`` is the
    policy's (both filled in at submission).
    """

    kind: Literal["ppo"] = Field(description="The job to run.")
    policy: str = Field(description="The starting policy: a chat fine-tuned run or checkpoint.")
    reward: str = Field(description="The reward model: a kind: reward run or checkpoint.")
    prompts: list[str] = Field(
        min_length=1,
        description="JSONL files of prompts: {prompt (, system)} or {messages} records.",
    )
    model: ModelSpec = Field(description="The policy's shape (filled in) and its sharding.")
    data: PolicyDataSpec = Field(description="The policy's shards (filled in).")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="How to sample.")
    ppo: PPOSpec = Field(default_factory=PPOSpec, description="PPO's settings.")
    optim: PPOOptimSpec = Field(default_factory=PPOOptimSpec, description="The optimizers.")
    checkpoint: PPOCheckpointSpec = Field(
        default_factory=PPOCheckpointSpec, description="Checkpoint frequency and retention."
    )
    workers: PPOWorkersSpec = Field(default_factory=PPOWorkersSpec, description="The workers.")
    frozen: FrozenSpec = Field(
        default_factory=FrozenSpec, description="Where the reference and reward models run."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_policy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
            return data
        data = dict(data)
        model = data.get("model")
        if model is None or set(model) <= {"parallel"}:
            from crucible.jobs.finetune.base import base_config

            shape = base_config(BaseSpec(checkpoint=data["policy"])).model_dump()
            data["model"] = {**(model or {}), **shape}
        if "data" not in data:
            from crucible.jobs.rlhf.rejection import policy_shards

            data["data"] = {"shards": policy_shards(data["policy"])}
        return data


RunSpec = (
    DataRunSpec
    | TrainRunSpec
    | FinetuneRunSpec
    | RewardRunSpec
    | RejectionSamplingRunSpec
    | PPORunSpec
)
KINDS: dict[str, type[RunSpec]] = {
    "data": DataRunSpec,
    "train": TrainRunSpec,
    "finetune": FinetuneRunSpec,
    "reward": RewardRunSpec,
    "rejection-sampling": RejectionSamplingRunSpec,
    "ppo": PPORunSpec,
}
# Runs whose checkpoints hold a language model (``model`` and ``data.shards``): generate, eval
# and export read them.
LanguageModelRunSpec = TrainRunSpec | PPORunSpec
TRAINING_KINDS = ("train", "finetune", "reward")  # the kinds the train job runs


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Load a spec file, apply ``--set`` overrides and validate it strictly."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return parse_spec(data, source=str(path))


def parse_spec(data: dict[str, Any], source: str = "spec") -> RunSpec:
    """Validate an in-memory spec mapping as the spec class of its ``kind``."""
    kind = data.get("kind")
    if kind is None:
        raise CrucibleError(f"{source}: kind is required (one of: {', '.join(KINDS)})")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CrucibleError(
            f"{source}: kind = {json.dumps(kind, default=str)} is invalid: "
            f"use one of {', '.join(KINDS)}"
        )
    return validate(cls, data, source=source)


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML (every default filled in), as saved in the run directory."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def write_resolved(spec: RunSpec, run: Location) -> Location:
    """Write ``spec.resolved.yaml`` (and its hash) into run directory ``run``; return it."""
    out = run / "spec.resolved.yaml"
    out.write_text(f"# spec sha256: {spec_hash(spec)}\n" + dump_spec(spec))
    return out
