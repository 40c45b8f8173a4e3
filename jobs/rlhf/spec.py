"""The sections of the rejection-sampling and PPO specs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from crucible.config import StrictModel


class SamplingSpec(StrictModel):
    """How answers are drawn from the policy."""

    samples_per_prompt: int = Field(8, ge=2, description="Answers drawn per prompt (K).")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens per answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k likeliest tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: probability mass kept.")
    seed: int = Field(0, description="Batch i is sampled with seed + i.")
    prompts_per_batch: int = Field(
        16, ge=1, description="Prompts per generation batch (times K sequences)."
    )


class RolloutSpec(StrictModel):
    """How a PPO step's answers are sampled from the policy."""

    prompts_per_step: int = Field(
        16, ge=1, description="Prompts per PPO step, over all workers (one answer each)."
    )
    max_new_tokens: int = Field(32, ge=1, description="Most tokens per answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k likeliest tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: probability mass kept.")


class PPOSpec(StrictModel):
    """PPO's settings (defaults as TRL's and OpenRLHF's)."""

    steps: int = Field(100, ge=1, description="PPO steps (one rollout and its updates each).")
    epochs: int = Field(1, ge=1, description="Passes over each rollout.")
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps per pass: the rollout cut into this many parts."
    )
    clip_range: float = Field(0.2, gt=0, description="ε of the clipped policy objective.")
    value_clip_range: float = Field(0.2, gt=0, description="How far a value may move per update.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's λ.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty to the reference.")
    kl_target: float | None = Field(
        None, gt=0, description="Adapt kl_coef towards this KL per answer (null: fixed)."
    )
    kl_horizon: int = Field(10000, ge=1, description="Answers over which kl_coef adapts.")
    normalize_rewards: bool = Field(
        True, description="Scale scores by their running standard deviation and centre them."
    )
    whiten_advantages: bool = Field(True, description="Advantages to mean 0, variance 1.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping of both models.")


class PPOOptimSpec(StrictModel):
    """AdamW of the actor (policy) and the critic (value model)."""

    actor_lr: float = Field(1e-5, gt=0, description="The policy's learning rate.")
    critic_lr: float = Field(1e-5, gt=0, description="The value model's learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of matrices.")


class PPOWorkersSpec(StrictModel):
    """The Ray Train workers: each holds the actor and the critic (and the frozen models when
    they are colocated) and a slice of every step's prompts."""

    num_workers: int = Field(1, ge=1, description="Data-parallel workers.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    use_gpu: bool | None = Field(
        None, description="One GPU per worker; null: if the cluster has GPUs."
    )
    seed: int = Field(0, description="Seed of prompt order, sampling and updates.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts before giving up.")


class FrozenSpec(StrictModel):
    """Where the reference and reward models (never trained) run: whole on every worker, or
    in Ray actors of their own (see :mod:`crucible.jobs.rlhf.frozen`)."""

    placement: Literal["colocated", "separate"] = Field(
        "colocated",
        description="colocated: on every worker beside the actor and critic; separate: in "
        "num_actors Ray actors with their own CPUs or GPU.",
    )
    num_actors: int = Field(
        1, ge=1, description="separate: actors, each holding both models (worker i uses i mod n)."
    )
    cpus_per_actor: float = Field(1, gt=0, description="separate: CPUs reserved per actor.")
    use_gpu: bool | None = Field(
        None, description="separate: one GPU per actor; null: if the cluster has GPUs."
    )


class PPOCheckpointSpec(StrictModel):
    """When the actor and critic are saved together (synchronously)."""

    every_steps: int = Field(20, ge=1, description="Save every N PPO steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Keep the newest K checkpoints.")
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="How a resume checks a checkpoint's files."
    )


class PolicyDataSpec(StrictModel):
    """The policy's shards, for their tokenizer and chat template (filled in from the policy
    at submission; generation, evaluation and export of the run read them)."""

    shards: str = Field(description="The policy run's data.shards.")
