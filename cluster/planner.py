"""The planner: what a training run needs and costs before a GPU is rented.

Given a model, a cluster and a batch, :func:`plan` works out the per-GPU memory (ZeRO model
states exactly as DeepSpeed estimates them, activations per Korthikanti et al. 2022, logits),
picks the micro-batch and activation checkpointing that fit and run fastest, and predicts the
step time from a compute term and a ZeRO communication term (:mod:`crucible.cluster.comm`):

    compute = hardware FLOPs per GPU per step / (peak × compute_efficiency)
    comm    = cross-node bytes / (NIC × network_efficiency) + NVLink bytes / (NVLink × eff.)
    step    = max(compute, comm) + (1 − overlap) × min(compute, comm)

A run is network-bound when comm > compute. MFU follows as model FLOPs (6N + attention, no
recomputation) over step time × peak. The constants of :class:`StepModel` are one set for
every prediction, calibrated on published A100 runs (see ``tests/cluster/test_planner_
published.py``); an assumed MFU or throughput replaces the prediction when given.

Everything the run cannot do is reported, not raised: an infeasible plan says why, by how
much, and which knob helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from crucible.cluster.comm import CommVolume, zero_comm_volume
from crucible.cluster.hardware import Accelerator, get_accelerator, with_overrides
from crucible.cluster.memory import (
    activation_bytes,
    logits_bytes,
    model_states,
)
from crucible.errors import CrucibleError
from crucible.model.accounting import (
    hardware_flops_per_token,
    largest_layer_params,
    model_flops_per_token,
    num_params,
)
from crucible.model.parallelize import ParallelSpec

if TYPE_CHECKING:
    from crucible.cluster.spec import ClusterSpec
    from crucible.jobs.spec import TrainRunSpec
    from crucible.model.config import ModelConfig

GiB = 2**30


@dataclass(frozen=True)
class StepModel:
    """The step-time model's fixed constants (one set for all plans; see module docstring).

    Fitted once on a grid (worst relative error over the published points of
    ``tests/cluster/test_planner_published.py``: Narayanan et al. 2021 Table 2, ZeRO-3 175B
    and 530B on 384–2240 A100s; MosaicML LLM Foundry FSDP MPT-30B/70B on 64–128 A100s),
    not per point.
    """

    compute_efficiency: float = 0.75  # of peak, on the FLOPs the hardware executes
    network_efficiency: float = 0.70  # of NIC line rate achieved by NCCL collectives
    nvlink_efficiency: float = 0.70  # of one NVLink direction achieved by NCCL collectives
    overlap: float = 0.70  # fraction of the shorter of compute/comm hidden behind the longer
    memory_headroom: float = 0.10  # of GPU memory kept for CUDA context, allocator, buffers
    pcie_bytes_per_s: float = 25e9  # achieved host↔GPU bandwidth (PCIe 4.0 x16) for offload


@dataclass(frozen=True)
class Alternative:
    """A variation of a plan and what it would give."""

    change: str
    feasible: bool
    micro_batch_size: int
    grad_accum_steps: int
    step_seconds: float
    bound: str
    mfu: float
    days: float
    gpu_hours: float
    cost_usd: float


@dataclass
class Plan:
    """Everything the planner worked out for one configuration."""

    model: str
    params: int
    gpu: str
    nodes: int
    gpus_per_node: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    hpz_partition_size: int
    quantized_weights: bool
    quantized_gradients: bool
    activation_checkpointing: bool
    global_batch_size: int
    seq_len: int
    micro_batch_size: int
    grad_accum_steps: int
    tokens: float
    steps: int
    gpu_memory_bytes: int
    usable_memory_bytes: int
    state_bytes: int
    state_cpu_bytes_per_node: int
    hpz_bytes: int
    activation_bytes: int
    logits_bytes: int
    states_by_stage: dict[int, int]
    max_micro_batch_size: int
    compute_seconds: float
    comm_seconds: float
    offload_seconds: float
    step_seconds: float
    bound: str
    mfu: float
    hardware_tflops_per_gpu: float
    comm: CommVolume
    days: float
    gpu_hours: float
    energy_mwh: float
    cost_usd: float
    usd_per_gpu_hour: float
    peak_flops: float
    peak_measured: bool
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)

    @property
    def num_gpus(self) -> int:
        """All GPUs (every one a data-parallel rank)."""
        return self.nodes * self.gpus_per_node

    @property
    def feasible(self) -> bool:
        """The run fits and the batch divides: nothing in :attr:`problems`."""
        return not self.problems

    @property
    def memory_bytes(self) -> int:
        """Peak memory per GPU: model states + hpZ shard + activations + logits."""
        return self.state_bytes + self.hpz_bytes + self.activation_bytes + self.logits_bytes

    def deepspeed_config(self, parallel: ParallelSpec | None = None) -> dict[str, Any]:
        """The DeepSpeed config of this plan (batch shape and the ZeRO/ZeRO++ knobs).

        Args:
            parallel: the spec's parallel section, for knobs the plan does not choose.
        """
        from crucible.model.parallelize import build_deepspeed_config

        base = parallel or ParallelSpec(zero_stage=self.zero_stage)
        chosen = base.model_copy(
            update={
                "zero_stage": self.zero_stage,
                "offload_optimizer": "cpu" if self.offload_optimizer else "none",
                "offload_params": "cpu" if self.offload_params else "none",
                "activation_checkpointing": self.activation_checkpointing,
                "zero_hpz_partition_size": self.hpz_partition_size,
                "zero_quantized_weights": self.quantized_weights,
                "zero_quantized_gradients": self.quantized_gradients,
            }
        )
        return build_deepspeed_config(
            chosen,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            world_size=self.num_gpus,
        )


@dataclass(frozen=True)
class _Inputs:
    cfg: ModelConfig
    name: str
    acc: Accelerator
    nodes: int
    pue: float
    parallel: ParallelSpec
    global_batch_size: int
    seq_len: int
    tokens: float
    micro_batch_size: int | None
    checkpointing: bool | None
    scores_stored: bool
    assumed_mfu: float | None
    assumed_flops_per_gpu: float | None
    step_model: StepModel


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
    """
    if global_batch_size < 1:
        raise CrucibleError(f"optim.global_batch_size must be at least 1, got {global_batch_size}")
    if tokens <= 0:
        raise CrucibleError(f"train.max_tokens must be positive, got {tokens:g}")
    if assumed_mfu is not None and not 0 < assumed_mfu <= 1:
        raise CrucibleError(f"the assumed MFU must be in (0, 1], got {assumed_mfu}")
    seq = seq_len or cfg.max_seq_len
    inputs = _Inputs(
        cfg=cfg,
        name=model_name,
        acc=resolve_accelerator(cluster),
        nodes=cluster.nodes,
        pue=cluster.pue,
        parallel=parallel or ParallelSpec(),
        global_batch_size=global_batch_size,
        seq_len=seq,
        tokens=tokens,
        micro_batch_size=micro_batch_size,
        checkpointing=activation_checkpointing,
        scores_stored=scores_stored,
        assumed_mfu=assumed_mfu,
        assumed_flops_per_gpu=assumed_flops_per_gpu,
        step_model=step_model or StepModel(),
    )
    result = _plan(inputs)
    if alternatives:
        result.alternatives = _alternatives(inputs, result)
        result.advice += _advice(inputs, result)
    return result


def plan_from_spec(spec: TrainRunSpec, **overrides: Any) -> Plan:
    """Plan a train spec: its model, parallel section, batch, budget and cluster.

    Args:
        spec: the train run spec.
        overrides: keyword arguments of :func:`plan` that replace the spec's values.
    """
    cfg = spec.model.resolve()
    seq = overrides.pop("seq_len", None) or cfg.max_seq_len
    tokens = spec.train.max_tokens
    if tokens is None:
        assert spec.train.max_steps is not None  # the spec requires one of them
        tokens = float(spec.train.max_steps * spec.optim.global_batch_size * seq)
    kwargs: dict[str, Any] = {
        "global_batch_size": spec.optim.global_batch_size,
        "tokens": tokens,
        "seq_len": seq,
        "micro_batch_size": spec.optim.micro_batch_size,
        "activation_checkpointing": spec.model.parallel.activation_checkpointing,
        "scores_stored": spec.data.mask_cross_document,
        "model_name": spec.model.preset or spec.name,
    } | overrides
    result = plan(cfg, spec.cluster, spec.model.parallel, **kwargs)
    if spec.train.num_workers != result.num_gpus:
        result.notes.append(
            f"train.num_workers is {spec.train.num_workers} but the cluster has "
            f"{result.num_gpus} GPUs; set train.num_workers: {result.num_gpus} to use them all"
        )
    return result


def _states(inp: _Inputs, stage: int, nodes: int) -> tuple[int, int]:
    p = inp.parallel
    s = model_states(
        stage,
        num_params(inp.cfg),
        largest_layer_params(inp.cfg),
        inp.acc.gpus_per_node,
        nodes,
        offload_optimizer=p.offload_optimizer != "none",
        offload_params=p.offload_params != "none" and stage == 3,
    )
    return s.gpu_bytes, s.cpu_bytes


def _per_sequence_bytes(inp: _Inputs, ckpt: bool) -> float:
    """Activation + logits bytes per sequence of micro-batch (memory is linear in it)."""
    return activation_bytes(inp.cfg, 1, inp.seq_len, ckpt, inp.scores_stored) + logits_bytes(
        inp.cfg, 1, inp.seq_len
    )


def _fixed_bytes(inp: _Inputs) -> int:
    states, _ = _states(inp, inp.parallel.zero_stage, inp.nodes)
    hpz = inp.parallel.zero_hpz_partition_size
    return states + (int(2 * num_params(inp.cfg) / hpz) if hpz > 1 else 0)


def _usable(inp: _Inputs) -> int:
    return int(inp.acc.memory_bytes * (1 - inp.step_model.memory_headroom))


def _max_micro(inp: _Inputs, ckpt: bool) -> int:
    room = _usable(inp) - _fixed_bytes(inp)
    return max(0, int(room // _per_sequence_bytes(inp, ckpt)))


def _timing(inp: _Inputs, micro: int, accum: int, ckpt: bool) -> dict[str, Any]:
    """Compute, communication, offload and step seconds, bound, MFU for one configuration."""
    cfg, acc, sm, p = inp.cfg, inp.acc, inp.step_model, inp.parallel
    n = inp.nodes * acc.gpus_per_node
    tokens_per_gpu = micro * accum * inp.seq_len
    hw_flops = tokens_per_gpu * hardware_flops_per_token(cfg, inp.seq_len, recompute=ckpt)
    model_flops = tokens_per_gpu * model_flops_per_token(cfg, inp.seq_len)
    comm = zero_comm_volume(
        num_params(cfg),
        p.zero_stage,
        acc.gpus_per_node,
        inp.nodes,
        accum,
        p.zero_hpz_partition_size,
        p.zero_quantized_weights,
        p.zero_quantized_gradients,
    )
    if comm.inter_node_bytes and not acc.inter_node_bytes_per_s:
        raise CrucibleError(
            f"cluster.gpu {acc.name} has no inter-node bandwidth in the catalogue; set "
            "cluster.gpu (e.g. a100-80gb) or cluster.nic_gbps_per_gpu to plan several nodes"
        )
    if comm.intra_node_bytes and not acc.intra_node_bytes_per_s:
        raise CrucibleError(
            f"cluster.gpu {acc.name} has no intra-node bandwidth in the catalogue; set "
            "cluster.gpu (e.g. a100-80gb) or cluster.nvlink_gb_per_s"
        )
    comm_s = comm.seconds(
        acc.inter_node_bytes_per_s * sm.network_efficiency,
        acc.intra_node_bytes_per_s * sm.nvlink_efficiency,
    )
    shard = num_params(cfg) / n
    offload_s = 0.0
    if p.offload_optimizer != "none":
        offload_s += 4 * shard / sm.pcie_bytes_per_s  # bf16 grads out, bf16 weights back
    if p.offload_params != "none" and p.zero_stage == 3:
        offload_s += accum * 2 * 2 * shard / sm.pcie_bytes_per_s  # shard fetched fwd + bwd
    if inp.assumed_mfu is not None:
        compute_s = model_flops / (acc.peak_flops * inp.assumed_mfu)
        step_s, bound = compute_s, "assumed MFU"
    elif inp.assumed_flops_per_gpu is not None:
        compute_s = hw_flops / inp.assumed_flops_per_gpu
        step_s, bound = compute_s, "assumed throughput"
    else:
        compute_s = hw_flops / (acc.peak_flops * sm.compute_efficiency)
        longer, shorter = max(compute_s, comm_s), min(compute_s, comm_s)
        step_s = longer + (1 - sm.overlap) * shorter + offload_s
        bound = "network" if comm_s > compute_s else "compute"
    return {
        "compute_seconds": compute_s,
        "comm_seconds": comm_s,
        "offload_seconds": offload_s,
        "step_seconds": step_s,
        "bound": bound,
        "mfu": model_flops / (step_s * acc.peak_flops),
        "hardware_tflops_per_gpu": hw_flops / step_s / 1e12,
        "comm": comm,
    }


def _choose(inp: _Inputs, per_rank: int) -> tuple[int, bool, bool]:
    """(micro-batch, checkpointing, fits): the fastest configuration that fits."""
    ckpts = [inp.checkpointing] if inp.checkpointing is not None else [False, True]
    best: tuple[float, int, bool] | None = None
    for ckpt in ckpts:
        limit = _max_micro(inp, ckpt)
        if inp.micro_batch_size is not None:
            micros = [inp.micro_batch_size]
        else:
            micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        for m in micros:
            if m > limit:
                continue
            t = _timing(inp, m, max(1, math.ceil(per_rank / m)), ckpt)["step_seconds"]
            if best is None or t < best[0] * 0.999:
                best = (t, m, ckpt)
    if best is not None:
        return best[1], best[2], True
    return inp.micro_batch_size or 1, ckpts[-1], False


def _plan(inp: _Inputs) -> Plan:
    cfg, acc, p = inp.cfg, inp.acc, inp.parallel
    n = inp.nodes * acc.gpus_per_node
    problems: list[str] = []
    per_rank, rem = divmod(inp.global_batch_size, n)
    if rem or per_rank < 1:
        problems.append(
            f"optim.global_batch_size {inp.global_batch_size} is not divisible by the "
            f"data-parallel size {n} (cluster.nodes {inp.nodes} × {acc.gpus_per_node} GPUs); "
            f"use a global batch of {_near_multiples(inp.global_batch_size, n)} or "
            f"{_node_counts(inp.global_batch_size, acc.gpus_per_node, inp.nodes)}"
        )
        per_rank = max(1, math.ceil(inp.global_batch_size / n))
    if inp.micro_batch_size is not None and per_rank % inp.micro_batch_size:
        problems.append(
            f"optim.micro_batch_size {inp.micro_batch_size} does not divide the "
            f"{per_rank} sequences per GPU; use one of "
            f"{[m for m in range(1, per_rank + 1) if per_rank % m == 0][-6:]}"
        )
    micro, ckpt, fits = _choose(inp, per_rank)
    accum = max(1, math.ceil(per_rank / micro))
    states, cpu_states = _states(inp, p.zero_stage, inp.nodes)
    hpz = p.zero_hpz_partition_size
    hpz_bytes = int(2 * num_params(cfg) / hpz) if hpz > 1 else 0
    act = activation_bytes(cfg, micro, inp.seq_len, ckpt, inp.scores_stored)
    logit = logits_bytes(cfg, micro, inp.seq_len)
    usable = _usable(inp)
    if not fits:
        need = states + hpz_bytes + act + logit
        what = (
            "the model states alone"
            if states + hpz_bytes > usable
            else f"model states + activations of micro-batch {micro}"
        )
        problems.append(
            f"{what} need {need / GiB:,.1f} GiB per GPU but {acc.name} has "
            f"{usable / GiB:,.1f} GiB usable: {(need - usable) / GiB:,.1f} GiB over"
        )
    t = _timing(inp, micro, accum, ckpt)
    steps = math.ceil(inp.tokens / (inp.global_batch_size * inp.seq_len))
    seconds = steps * t["step_seconds"]
    gpu_hours = seconds * n / 3600
    notes = []
    if acc.measured:
        notes.append(f"cpu peak {acc.peak_flops / 1e9:,.1f} GFLOP/s measured on this machine")
    if p.offload_optimizer != "none":
        notes.append("offload: PCIe transfers are modelled, the CPU Adam step is not")
    return Plan(
        model=inp.name,
        params=num_params(cfg),
        gpu=acc.name,
        nodes=inp.nodes,
        gpus_per_node=acc.gpus_per_node,
        zero_stage=p.zero_stage,
        offload_optimizer=p.offload_optimizer != "none",
        offload_params=p.offload_params != "none",
        hpz_partition_size=hpz,
        quantized_weights=p.zero_quantized_weights,
        quantized_gradients=p.zero_quantized_gradients,
        activation_checkpointing=ckpt,
        global_batch_size=inp.global_batch_size,
        seq_len=inp.seq_len,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        tokens=inp.tokens,
        steps=steps,
        gpu_memory_bytes=acc.memory_bytes,
        usable_memory_bytes=usable,
        state_bytes=states,
        state_cpu_bytes_per_node=cpu_states,
        hpz_bytes=hpz_bytes,
        activation_bytes=act,
        logits_bytes=logit,
        states_by_stage={s: _states(inp, s, inp.nodes)[0] for s in (1, 2, 3)},
        max_micro_batch_size=_max_micro(inp, ckpt),
        days=seconds / 86400,
        gpu_hours=gpu_hours,
        energy_mwh=gpu_hours * acc.watts * inp.pue / 1e6,
        cost_usd=gpu_hours * acc.usd_per_hour,
        usd_per_gpu_hour=acc.usd_per_hour,
        peak_flops=acc.peak_flops,
        peak_measured=acc.measured,
        problems=problems,
        notes=notes,
        **t,
    )


def _near_multiples(batch: int, n: int) -> str:
    lo = (batch // n) * n
    hi = lo + n
    return f"{lo} or {hi}" if lo else f"{hi}"


def _node_counts(batch: int, per_node: int, nodes: int) -> str:
    """Node counts near ``nodes`` whose GPU count divides ``batch``."""
    ok = [k for k in range(1, 4 * nodes + 1) if batch % (k * per_node) == 0]
    if not ok:
        return "a node count whose GPUs divide it"
    near = sorted(ok, key=lambda k: abs(k - nodes))[:2]
    return "cluster.nodes " + " or ".join(str(k) for k in sorted(near))


def _variant(inp: _Inputs, label: str, **changes: Any) -> tuple[str, _Inputs] | None:
    parallel_changes = changes.pop("parallel", None)
    try:
        parallel = inp.parallel.model_copy(update=parallel_changes or {})
        ParallelSpec.model_validate(parallel.model_dump())
    except Exception:
        return None
    return label, replace(inp, parallel=parallel, **changes)


def _summarise(label: str, pl: Plan) -> Alternative:
    return Alternative(
        change=label,
        feasible=pl.feasible,
        micro_batch_size=pl.micro_batch_size,
        grad_accum_steps=pl.grad_accum_steps,
        step_seconds=pl.step_seconds,
        bound=pl.bound,
        mfu=pl.mfu,
        days=pl.days,
        gpu_hours=pl.gpu_hours,
        cost_usd=pl.cost_usd,
    )


def _alternatives(inp: _Inputs, base: Plan) -> list[Alternative]:
    """What other knobs give: ZeRO++, node counts, batch, checkpointing, offload, stage."""
    p, per_node = inp.parallel, inp.acc.gpus_per_node
    free = replace(inp, micro_batch_size=None, checkpointing=None)
    cands: list[tuple[str, _Inputs] | None] = []
    # ZeRO++ on the spec's own batch shape, or on the planner's when that shape cannot run.
    zpp_base = inp if base.feasible else free
    if p.zero_stage == 3 and inp.nodes > 1:
        hpz = {"zero_hpz_partition_size": per_node}
        q = {"zero_quantized_weights": True, "zero_quantized_gradients": True}
        if p.zero_hpz_partition_size == 1:
            cands.append(
                _variant(zpp_base, f"ZeRO++ hpZ (secondary shard of {per_node})", parallel=hpz)
            )
        if not (p.zero_quantized_weights and p.zero_quantized_gradients):
            cands.append(
                _variant(zpp_base, "ZeRO++ qwZ + qgZ (int8 weights, int4 grads)", parallel=q)
            )
        cands.append(_variant(zpp_base, "ZeRO++ hpZ + qwZ + qgZ", parallel=hpz | q))
    if inp.micro_batch_size is not None or inp.checkpointing is not None:
        cands.append(("micro-batch and checkpointing chosen by the planner", free))
    if inp.nodes > 1:
        cands.append(_variant(free, f"{inp.nodes // 2} nodes", nodes=inp.nodes // 2))
    cands.append(_variant(free, f"{inp.nodes * 2} nodes", nodes=inp.nodes * 2))
    cands.append(
        _variant(
            free,
            f"global batch {inp.global_batch_size * 2} (larger per-GPU batch; changes the recipe)",
            global_batch_size=inp.global_batch_size * 2,
        )
    )
    if inp.global_batch_size % (inp.nodes * per_node):
        n = inp.nodes * per_node
        lo = (inp.global_batch_size // n) * n
        for gb in (lo, lo + n):
            if gb:
                cands.append(_variant(free, f"global batch {gb}", global_batch_size=gb))
        for k in range(inp.nodes - 1, 0, -1):
            if inp.global_batch_size % (k * per_node) == 0:
                cands.append(_variant(free, f"{k} nodes", nodes=k))
                break
    if not base.feasible:
        if p.offload_optimizer == "none" and p.zero_stage > 0:
            cands.append(
                _variant(free, "offload optimizer to CPU", parallel={"offload_optimizer": "cpu"})
            )
        if p.zero_stage < 3:
            cands.append(_variant(free, "ZeRO stage 3", parallel={"zero_stage": 3}))
    out = []
    for c in cands:
        if c is None:
            continue
        label, variant = c
        out.append(_summarise(label, _plan(variant)))
    return out


def _advice(inp: _Inputs, pl: Plan) -> list[str]:
    """What helps, in words: the knobs that make an infeasible plan fit or a slow one faster."""
    out = []
    if not pl.feasible:
        over = pl.memory_bytes - pl.usable_memory_bytes
        if over > 0:
            if not pl.activation_checkpointing and inp.checkpointing is not None:
                out.append("turn on model.parallel.activation_checkpointing")
            if pl.micro_batch_size > 1 and _max_micro(inp, pl.activation_checkpointing) >= 1:
                out.append(
                    f"use optim.micro_batch_size ≤ {_max_micro(inp, pl.activation_checkpointing)}"
                )
            nodes = _fitting_nodes(inp)
            if nodes:
                out.append(f"use at least {nodes} nodes (model states shard further)")
        feasible = [a for a in pl.alternatives if a.feasible]
        for alt in sorted(feasible, key=lambda a: a.days)[:4]:
            out.append(
                f"{alt.change}: feasible, MFU {alt.mfu:.0%} ({alt.bound}-bound), "
                f"{alt.days:,.1f} days, ${alt.cost_usd:,.0f}"
            )
        return out
    better = [a for a in pl.alternatives if a.feasible and a.mfu > pl.mfu * 1.02]
    for alt in sorted(better, key=lambda a: a.days)[:4]:
        out.append(
            f"{alt.change}: MFU {alt.mfu:.0%} ({alt.bound}-bound), {alt.days:,.1f} days, "
            f"${alt.cost_usd:,.0f}"
        )
    return out


def _fitting_nodes(inp: _Inputs) -> int | None:
    """The fewest nodes (up to 64× now) at which micro-batch 1 fits."""
    for k in range(inp.nodes + 1, inp.nodes * 64 + 1):
        variant = replace(inp, nodes=k, micro_batch_size=1)
        if _max_micro(variant, True) >= 1:
            return k
    return None
