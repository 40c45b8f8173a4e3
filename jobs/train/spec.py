"""The sections of a train spec owned by the train job: ``data``, ``optim``, ``checkpoint``,
``train`` (workers and budget), ``objective`` (next-token or masked-LM), ``monitoring``
(loggers besides Prometheus)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, model_validator

from crucible.config import StrictModel


class TrainDataSpec(StrictModel):
    """The ``data:`` section of a train spec: which shards, in which order."""

    shards: str = Field(
        description="Training shard directory (with manifest.json): a path or URI (s3://...)."
    )
    seed: int = Field(0, description="Seed of the global sample order.")
    verify: Literal["size", "sha256", "auto"] = Field(
        "auto", description="Shard checks on open: size always; sha256 for small sets on auto."
    )
    allow_manifest_change: bool = Field(
        False,
        description="Resume even if the shards' manifest differs from the checkpoint's.",
    )
    mask_cross_document: bool = Field(
        False, description="Restrict attention to tokens of the same document in packed rows."
    )
    skip_batches: list[NonNegativeInt] = Field(
        default_factory=list,
        description="Global batches (0-based) the reader steps over, as a rollback skips them.",
    )


class OptimSpec(StrictModel):
    """AdamW, the learning-rate schedule, batch and clipping."""

    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr.")
    schedule: Literal["cosine", "constant", "wsd"] = Field(
        "cosine", description="After warmup: cosine decay, constant, or warmup-stable-decay."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="WSD only: fraction of steps in the final decay."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0: none).")
    global_batch_size: int = Field(
        32, ge=1, description="Sequences per optimizer step, over all data-parallel ranks."
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Sequences per rank per forward/backward (accumulated)."
    )


class CheckpointSpec(StrictModel):
    """When checkpoints are written and which are kept."""

    every_steps: int = Field(100, ge=1, description="Save a checkpoint every N steps.")
    keep_last: int = Field(3, ge=1, description="Keep the newest K checkpoints ...")
    keep_every: int | None = Field(
        None, ge=1, description="... plus every checkpoint whose step is a multiple of M."
    )
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="How checkpoint files are checked on load."
    )
    async_save: bool = Field(
        True,
        description="Training waits only while the state is copied to host memory; files "
        "are written, hashed and committed in the background (one save in flight at most).",
    )
    test_stall_steps: list[NonNegativeInt] = Field(
        default_factory=list,
        description="Tests only: the asynchronous saves of these steps write their files and "
        "never commit (a test kills the run while they are in flight).",
    )


class TrainSpec(StrictModel):
    """Workers and the training budget."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool | None = Field(
        None, description="GPU workers (NCCL); null: use GPUs when the cluster has them."
    )
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places workers on nodes (STRICT_SPREAD: one worker per node).",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps.")
    max_tokens: float | None = Field(
        None, gt=0, description="Or stop after this many training tokens."
    )
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps (0: never).")
    eval_batches: int = Field(4, ge=1, description="Held-out batches per evaluation.")
    eval_prompts: str | None = Field(
        None,
        description="JSONL of prompt/reference records (as crucible eval --prompts takes): "
        "greedy exact match at every evaluation (language models; chat shards' template).",
    )
    eval_max_new_tokens: int = Field(
        32, ge=1, description="Most tokens per completion of eval_prompts."
    )
    max_failures: int = Field(
        3, ge=0, description="Worker-group restarts from the last checkpoint before giving up."
    )
    seed: int = Field(0, description="Seed of weight init and dropout.")
    log_every: int = Field(1, ge=1, description="Log a step line every N steps.")
    hang_timeout_s: float = Field(
        1800,
        ge=0,
        description="No step progress for this long: every thread's stack is dumped to "
        "workers/rank-<r>.stacks.log and the attempt fails (restart from the last "
        "checkpoint). 0: no watchdog.",
    )
    preemption_checkpoint: bool = Field(
        True,
        description="On SIGTERM (spot/preemptible VMs, Kubernetes, Slurm) every rank finishes "
        "its step, saves it and the attempt ends as preempted, to be restarted from it "
        "(false: SIGTERM ends a rank at once, losing the steps since the last checkpoint).",
    )
    preemption_grace_s: float = Field(
        30,
        ge=0,
        description="Seconds the platform leaves between SIGTERM and SIGKILL; rank 0 warns "
        "once when a step and a checkpoint take longer (0: no warning).",
    )
    gpu_hour_budget: float | None = Field(
        None, gt=0, description="Device-hours the run may use; Prometheus alerts past it."
    )
    straggler_check_every: int = Field(
        20,
        ge=0,
        description="Every N steps the ranks all-gather their median busy time per step "
        "(one float each) to find a straggler. 0: no straggler detection.",
    )
    straggler_factor: float = Field(
        1.5, gt=1, description="A rank busy this many times the other ranks' median is slow."
    )
    straggler_checks: int = Field(
        3, ge=1, description="Slow for this many checks in a row: reported as a straggler."
    )
    max_rollbacks: int = Field(
        3,
        ge=0,
        description="Rollbacks (reload the last checkpoint, skip the bad batches) allowed "
        "within rollback_window_steps; one more stops the run with an error. 0: none.",
    )
    rollback_window_steps: int = Field(
        1000, ge=1, description="The steps over which rollbacks are counted."
    )
    rollback_skip_batches: int = Field(
        1, ge=1, description="Global batches a rollback skips, from the one that went bad."
    )
    spike_window: int = Field(
        100,
        ge=0,
        description="Recent losses a step's loss is judged against (spike detection starts "
        "when this many are in; 0: only non-finite losses and grad norms roll back).",
    )
    spike_zscore: float = Field(
        6.0, gt=0, description="A loss this many standard deviations above the window's mean ..."
    )
    spike_ratio: float = Field(
        1.2, ge=1, description="... and this many times that mean is a spike."
    )
    test_nan_batches: list[NonNegativeInt] = Field(
        default_factory=list,
        description="Tests only: the training loss of these global batches is made NaN.",
    )
    test_spike_batches: list[NonNegativeInt] = Field(
        default_factory=list,
        description="Tests only: the training loss of these global batches is multiplied by 100.",
    )

    @model_validator(mode="after")
    def _has_budget(self) -> TrainSpec:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set train.max_steps or train.max_tokens")
        return self


class MonitoringSpec(StrictModel):
    """Where a run's metrics go besides Prometheus, the job log and ``metrics.jsonl``."""

    loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Extra loggers on rank 0: TensorBoard event files in <run>/tensorboard, "
        "Weights & Biases in offline mode in <run>/wandb.",
    )


class ObjectiveSpec(StrictModel):
    """What the model learns to predict: the next token (decoders), or masked tokens and,
    optionally, whether segment B follows segment A (BERT, Devlin et al. 2018)."""

    kind: Literal["clm", "mlm"] = Field(
        "clm", description="clm: next-token prediction (arch gpt); mlm: masked-LM (arch bert)."
    )
    mask_prob: float = Field(
        0.15, gt=0, lt=1, description="mlm: share of each row's tokens chosen for prediction."
    )
    mask_token_prob: float = Field(
        0.8, ge=0, le=1, description="mlm: of those, the share replaced by [MASK] ..."
    )
    random_token_prob: float = Field(
        0.1, ge=0, le=1, description="... and by a random token (the rest are left unchanged)."
    )
    whole_word: bool = Field(
        False, description="mlm: mask whole words (every WordPiece of a chosen word)."
    )
    nsp: bool = Field(
        False,
        description="mlm: next-sentence prediction: each row becomes [CLS] A [SEP] B [SEP], "
        "B following A in the row or (half the time) taken from another sample.",
    )

    @model_validator(mode="after")
    def _shares(self) -> ObjectiveSpec:
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError("mask_token_prob + random_token_prob must be at most 1")
        if self.kind == "clm" and (self.nsp or self.whole_word):
            raise ValueError("nsp and whole_word are options of kind: mlm")
        return self
