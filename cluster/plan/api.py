"""The planner's entry points.

* :func:`plan` — a model on a cluster: memory, micro-batch, step time, cost, alternatives.
* :func:`plan_from_spec` — the same for a train spec (``crucible plan SPEC``).
* :func:`plan_run` — what the train job runs on the workers it got (every rank calls it,
  ``crucible train run --dry-run`` prints it). It needs no accelerator: the batch shape,
  steps, DeepSpeed config and memory come from :func:`~crucible.cluster.plan.run_plan.run_plan`,
  the same function :func:`plan` builds its :attr:`Plan.run` with.

A train spec is read through :class:`TrainRun`, the shape of the sections the planner
reads; the planner never imports the job layer that defines the spec.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from crucible.cluster.hardware import Accelerator, get_accelerator, with_overrides
from crucible.cluster.plan.alternatives import advice
from crucible.cluster.plan.alternatives import alternatives as list_alternatives
from crucible.cluster.plan.fit import PlanInputs, build_plan
from crucible.cluster.plan.result import Plan
from crucible.cluster.plan.run_plan import RunPlan, run_plan
from crucible.cluster.plan.step_time import StepModel, Throughput
from crucible.errors import CrucibleError
from crucible.model.spec import ParallelSpec

if TYPE_CHECKING:
    from crucible.cluster.spec import ClusterSpec
    from crucible.model.config import ModelConfig
    from crucible.model.spec import ModelSpec


class _Optim(Protocol):
    @property
    def global_batch_size(self) -> int: ...
    @property
    def micro_batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def betas(self) -> tuple[float, float]: ...
    @property
    def eps(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def grad_clip(self) -> float: ...


class _Budget(Protocol):
    @property
    def num_workers(self) -> int: ...
    @property
    def max_steps(self) -> int | None: ...
    @property
    def max_tokens(self) -> float | None: ...


class _Data(Protocol):
    @property
    def mask_cross_document(self) -> bool: ...


class TrainRun(Protocol):
    """The sections of a train spec the planner reads (``crucible.jobs.spec.TrainRunSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> ModelSpec: ...
    @property
    def cluster(self) -> ClusterSpec: ...
    @property
    def optim(self) -> _Optim: ...
    @property
    def train(self) -> _Budget: ...
    @property
    def data(self) -> _Data: ...


def resolve_accelerator(cluster: ClusterSpec) -> Accelerator:
    """The catalogue entry for ``cluster.gpu`` with the cluster spec's overrides applied.

    Args:
        cluster: the cluster section.
    """
    return with_overrides(
        get_accelerator(cluster.gpu),
        usd_per_hour=cluster.usd_per_gpu_hour,
        watts=cluster.watts_per_gpu,
        nic_gbps=cluster.nic_gbps_per_gpu,
        nvlink_gb_per_s=cluster.nvlink_gb_per_s,
        gpus_per_node=cluster.gpus_per_node,
    )


def plan(
    cfg: ModelConfig,
    cluster: ClusterSpec,
    parallel: ParallelSpec | None = None,
    *,
    global_batch_size: int,
    tokens: float,
    seq_len: int | None = None,
    micro_batch_size: int | None = None,
    activation_checkpointing: bool | None = None,
    scores_stored: bool = False,
    assumed_mfu: float | None = None,
    assumed_flops_per_gpu: float | None = None,
    step_model: StepModel | None = None,
    model_name: str = "custom",
    alternatives: bool = True,
    grad_clip: float | None = 1.0,
    optimizer: dict[str, Any] | None = None,
) -> Plan:
    """Plan training ``cfg`` for ``tokens`` tokens on ``cluster``.

    Args:
        cfg: the model shape.
        cluster: the cluster section (GPU type, nodes, overrides).
        parallel: ZeRO stage, offload and ZeRO++ knobs (default: ZeRO-3, nothing else).
        global_batch_size: sequences per optimizer step over all GPUs.
        tokens: training tokens.
        seq_len: sequence length (default: ``cfg.max_seq_len``).
        micro_batch_size: sequences per GPU per forward; None picks the fastest that fits.
        activation_checkpointing: None picks the faster of on/off among what fits.
        scores_stored: attention scores are materialised (no flash attention, e.g. with a
            cross-document mask).
        assumed_mfu: use this MFU instead of the step-time model.
        assumed_flops_per_gpu: or this achieved hardware FLOP/s per GPU (counting the
            recomputed forward when checkpointing, as Megatron-LM reports it).
        step_model: the step-time constants.
        model_name: shown in the report.
        alternatives: also evaluate what ZeRO++, other node counts, batch or offload give.
        grad_clip: the DeepSpeed config's gradient clip.
        optimizer: the DeepSpeed config's ``optimizer`` section.
    """
    if global_batch_size < 1:
        raise CrucibleError(f"optim.global_batch_size must be at least 1, got {global_batch_size}")
    if tokens <= 0:
        raise CrucibleError(f"train.max_tokens must be positive, got {tokens:g}")
    if assumed_mfu is not None and not 0 < assumed_mfu <= 1:
        raise CrucibleError(f"the assumed MFU must be in (0, 1], got {assumed_mfu}")
    inputs = PlanInputs(
        cfg=cfg,
        name=model_name,
        acc=resolve_accelerator(cluster),
        nodes=cluster.nodes,
        pue=cluster.pue,
        parallel=parallel or ParallelSpec(),
        global_batch_size=global_batch_size,
        seq_len=seq_len or cfg.max_seq_len,
        tokens=tokens,
        micro_batch_size=micro_batch_size,
        checkpointing=activation_checkpointing,
        scores_stored=scores_stored,
        assumed=Throughput(assumed_mfu, assumed_flops_per_gpu),
        step_model=step_model or StepModel(),
        grad_clip=grad_clip,
        optimizer=optimizer,
    )
    result = build_plan(inputs)
    if alternatives:
        result.alternatives = list_alternatives(inputs, result)
        result.advice += advice(inputs, result)
    return result


def optimizer_section(optim: _Optim, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's ``optimizer`` section: AdamW with the spec's hyper-parameters.

    On CPU DeepSpeed's fused Adam is unavailable, so ``torch_adam`` selects torch's AdamW.

    Args:
        optim: the spec's ``optim`` section.
        use_gpu: whether workers run on GPUs.
    """
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
        "adam_w_mode": True,
    }
    if not use_gpu:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def _tokens(spec: TrainRun, seq_len: int) -> float:
    """The run's token budget (``train.max_steps`` counts whole steps)."""
    if spec.train.max_steps is not None:
        return float(spec.train.max_steps * spec.optim.global_batch_size * seq_len)
    assert spec.train.max_tokens is not None  # the spec requires one of them
    return spec.train.max_tokens


def plan_from_spec(spec: TrainRun, **overrides: Any) -> Plan:
    """Plan a train spec on its cluster: its model, parallel section, batch and budget.

    Args:
        spec: the train run spec.
        overrides: keyword arguments of :func:`plan` that replace the spec's values.
    """
    cfg = spec.model.resolve()
    seq = overrides.pop("seq_len", None) or cfg.max_seq_len
    kwargs: dict[str, Any] = {
        "global_batch_size": spec.optim.global_batch_size,
        "tokens": _tokens(spec, seq),
        "seq_len": seq,
        "micro_batch_size": spec.optim.micro_batch_size,
        "activation_checkpointing": spec.model.parallel.activation_checkpointing,
        "scores_stored": spec.data.mask_cross_document,
        "model_name": spec.model.preset or spec.name,
        "grad_clip": spec.optim.grad_clip,
        "optimizer": optimizer_section(spec.optim, use_gpu=spec.cluster.gpu != "cpu"),
    } | overrides
    result = plan(cfg, spec.cluster, spec.model.parallel, **kwargs)
    if spec.train.num_workers != result.num_gpus:
        result.notes.append(
            f"train.num_workers is {spec.train.num_workers} but the cluster has "
            f"{result.num_gpus} GPUs; set train.num_workers: {result.num_gpus} to use them all"
        )
    return result


def plan_run(
    spec: TrainRun, world_size: int, seq_len: int | None = None, use_gpu: bool = False
) -> RunPlan:
    """What every rank of ``spec`` runs on ``world_size`` ranks.

    Args:
        spec: the train spec.
        world_size: data-parallel ranks.
        seq_len: the shards' sequence length (default: the model's max_seq_len).
        use_gpu: whether workers run on GPUs (selects the Adam implementation).

    Raises:
        CrucibleError: the shards' sequences are too long for the model, or the global batch
            does not split into micro-batches on the ranks.
    """
    o = spec.optim
    cfg = spec.model.resolve()
    seq = seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise CrucibleError(
            f"the shards' sequence length {seq} exceeds model.max_seq_len {cfg.max_seq_len}; "
            "raise max_seq_len or use shards packed for this model"
        )
    per_rank, rem = divmod(o.global_batch_size, world_size)
    accum, rem2 = divmod(per_rank, o.micro_batch_size) if not rem else (0, 1)
    if rem or rem2 or accum < 1:
        raise CrucibleError(
            f"optim.global_batch_size {o.global_batch_size} must be a multiple of "
            f"optim.micro_batch_size {o.micro_batch_size} × {world_size} workers; "
            "change one of them"
        )
    return run_plan(
        cfg,
        spec.model.parallel,
        # The ranks as one node: GPU memory depends on the world size alone.
        gpus_per_node=world_size,
        nodes=1,
        global_batch_size=o.global_batch_size,
        micro_batch_size=o.micro_batch_size,
        grad_accum_steps=accum,
        seq_len=seq,
        total_steps=spec.train.max_steps
        or math.ceil(_tokens(spec, seq) / (o.global_batch_size * seq)),
        scores_stored=spec.data.mask_cross_document,
        grad_clip=o.grad_clip,
        optimizer=optimizer_section(o, use_gpu),
    )
