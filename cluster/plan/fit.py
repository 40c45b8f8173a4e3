"""Fitting a run onto a cluster: the micro-batch and activation checkpointing that fit in GPU
memory and run fastest, the checks on the batch shape, and the :class:`Plan` they give.

Everything the run cannot do is reported in :attr:`Plan.problems`, not raised: an
infeasible plan says why, by how much, and which knob helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from crucible.cluster.plan.memory import (
    GiB,
    activation_bytes,
    hpz_bytes,
    logits_bytes,
    state_memory,
)
from crucible.cluster.plan.result import Plan
from crucible.cluster.plan.run_plan import run_plan
from crucible.cluster.plan.step_time import StepModel, StepTime, Throughput, step_time
from crucible.model.accounting import num_params

if TYPE_CHECKING:
    from crucible.cluster.hardware import Accelerator
    from crucible.model.config import ModelConfig
    from crucible.model.spec import ParallelSpec


@dataclass(frozen=True)
class PlanInputs:
    """Everything one plan depends on (alternatives are variations of it)."""

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
    assumed: Throughput
    step_model: StepModel
    grad_clip: float | None = 1.0
    optimizer: dict[str, Any] | None = None

    @property
    def num_gpus(self) -> int:
        """All GPUs; every one is a data-parallel rank."""
        return self.nodes * self.acc.gpus_per_node


def usable_bytes(inp: PlanInputs) -> int:
    """GPU memory a run may use: all of it less the step model's headroom."""
    return int(inp.acc.memory_bytes * (1 - inp.step_model.memory_headroom))


def max_micro_batch(inp: PlanInputs, ckpt: bool) -> int:
    """The largest micro-batch that fits (memory is linear in it; 0: not even one).

    Args:
        inp: the plan's inputs.
        ckpt: activation checkpointing on.
    """
    states = state_memory(
        inp.cfg, inp.parallel, inp.parallel.zero_stage, inp.acc.gpus_per_node, inp.nodes
    )
    room = usable_bytes(inp) - states.gpu_bytes - hpz_bytes(inp.cfg, inp.parallel)
    per_sequence = activation_bytes(
        inp.cfg, 1, inp.seq_len, ckpt, inp.scores_stored
    ) + logits_bytes(inp.cfg, 1, inp.seq_len)
    return max(0, int(room // per_sequence))


def _step_time(inp: PlanInputs, micro: int, accum: int, ckpt: bool) -> StepTime:
    return step_time(
        inp.cfg,
        inp.parallel,
        inp.acc,
        nodes=inp.nodes,
        seq_len=inp.seq_len,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        checkpointing=ckpt,
        step_model=inp.step_model,
        assumed=inp.assumed,
    )


def _choose(inp: PlanInputs, per_rank: int) -> tuple[int, bool, bool]:
    """(micro-batch, checkpointing, fits): the fastest configuration that fits."""
    ckpts = [inp.checkpointing] if inp.checkpointing is not None else [False, True]
    best: tuple[float, int, bool] | None = None
    for ckpt in ckpts:
        limit = max_micro_batch(inp, ckpt)
        if inp.micro_batch_size is not None:
            micros = [inp.micro_batch_size]
        else:
            micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        for m in micros:
            if m > limit:
                continue
            t = _step_time(inp, m, max(1, math.ceil(per_rank / m)), ckpt).step_seconds
            if best is None or t < best[0] * 0.999:
                best = (t, m, ckpt)
    if best is not None:
        return best[1], best[2], True
    return inp.micro_batch_size or 1, ckpts[-1], False


def _batch_problems(inp: PlanInputs) -> tuple[int, list[str]]:
    """Sequences per rank, and what is wrong with the batch shape."""
    n, per_node = inp.num_gpus, inp.acc.gpus_per_node
    problems: list[str] = []
    per_rank, rem = divmod(inp.global_batch_size, n)
    if rem or per_rank < 1:
        problems.append(
            f"optim.global_batch_size {inp.global_batch_size} is not divisible by the "
            f"data-parallel size {n} (cluster.nodes {inp.nodes} × {per_node} GPUs); "
            f"use a global batch of {_near_multiples(inp.global_batch_size, n)} or "
            f"{_node_counts(inp.global_batch_size, per_node, inp.nodes)}"
        )
        per_rank = max(1, math.ceil(inp.global_batch_size / n))
    if inp.micro_batch_size is not None and per_rank % inp.micro_batch_size:
        problems.append(
            f"optim.micro_batch_size {inp.micro_batch_size} does not divide the "
            f"{per_rank} sequences per GPU; use one of "
            f"{[m for m in range(1, per_rank + 1) if per_rank % m == 0][-6:]}"
        )
    return per_rank, problems


def build_plan(inp: PlanInputs) -> Plan:
    """The plan of ``inp``, without alternatives or advice.

    Args:
        inp: the plan's inputs.
    """
    cfg, acc, p = inp.cfg, inp.acc, inp.parallel
    per_rank, problems = _batch_problems(inp)
    micro, ckpt, fits = _choose(inp, per_rank)
    accum = max(1, math.ceil(per_rank / micro))
    steps = math.ceil(inp.tokens / (inp.global_batch_size * inp.seq_len))
    run = run_plan(
        cfg,
        p.model_copy(update={"activation_checkpointing": ckpt}),
        gpus_per_node=acc.gpus_per_node,
        nodes=inp.nodes,
        global_batch_size=inp.global_batch_size,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        seq_len=inp.seq_len,
        total_steps=steps,
        scores_stored=inp.scores_stored,
        grad_clip=inp.grad_clip,
        optimizer=inp.optimizer,
    )
    usable = usable_bytes(inp)
    mem = run.memory
    if not fits:
        what = (
            "the model states alone"
            if mem.state_bytes + mem.hpz_bytes > usable
            else f"model states + activations of micro-batch {micro}"
        )
        need = mem.total_bytes
        problems.append(
            f"{what} need {need / GiB:,.1f} GiB per GPU but {acc.name} has "
            f"{usable / GiB:,.1f} GiB usable: {(need - usable) / GiB:,.1f} GiB over"
        )
    t = _step_time(inp, micro, accum, ckpt)
    gpu_hours = steps * t.step_seconds * inp.num_gpus / 3600
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
        hpz_partition_size=p.zero_hpz_partition_size,
        quantized_weights=p.zero_quantized_weights,
        quantized_gradients=p.zero_quantized_gradients,
        activation_checkpointing=ckpt,
        tokens=inp.tokens,
        run=run,
        gpu_memory_bytes=acc.memory_bytes,
        usable_memory_bytes=usable,
        states_by_stage={
            s: state_memory(cfg, p, s, acc.gpus_per_node, inp.nodes).gpu_bytes for s in (1, 2, 3)
        },
        max_micro_batch_size=max_micro_batch(inp, ckpt),
        days=steps * t.step_seconds / 86400,
        gpu_hours=gpu_hours,
        energy_mwh=gpu_hours * acc.watts * inp.pue / 1e6,
        cost_usd=gpu_hours * acc.usd_per_hour,
        usd_per_gpu_hour=acc.usd_per_hour,
        peak_flops=acc.peak_flops,
        peak_measured=acc.measured,
        problems=problems,
        notes=notes,
        **vars(t),
    )


def fitting_nodes(inp: PlanInputs) -> int | None:
    """The fewest nodes (up to 64× now) at which micro-batch 1 fits."""
    for k in range(inp.nodes + 1, inp.nodes * 64 + 1):
        if max_micro_batch(replace(inp, nodes=k, micro_batch_size=1), True) >= 1:
            return k
    return None


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
