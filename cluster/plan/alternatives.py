"""What other choices give: ZeRO++, other node counts, a larger batch, offload, another
ZeRO stage, each planned in full; and the advice, in words, that follows from them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from crucible.cluster.plan.fit import PlanInputs, build_plan, fitting_nodes, max_micro_batch
from crucible.cluster.plan.result import Alternative, Plan
from crucible.errors import CrucibleError
from crucible.model.spec import ParallelSpec


def _variant(inp: PlanInputs, label: str, **changes: Any) -> tuple[str, PlanInputs] | None:
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


def alternatives(inp: PlanInputs, base: Plan) -> list[Alternative]:
    """What other knobs give: ZeRO++, node counts, batch, checkpointing, offload, stage.

    Args:
        inp: the inputs of ``base``.
        base: the plan as the inputs ask for it.
    """
    p, per_node = inp.parallel, inp.acc.gpus_per_node
    free = replace(inp, micro_batch_size=None, checkpointing=None)
    cands: list[tuple[str, PlanInputs] | None] = []
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
        try:
            out.append(_summarise(label, build_plan(variant)))
        except CrucibleError:  # a variant the catalogue cannot time (e.g. CPU across nodes)
            continue
    return out


def advice(inp: PlanInputs, pl: Plan) -> list[str]:
    """What helps, in words: the knobs that make an infeasible plan fit or a slow one faster.

    Args:
        inp: the inputs of ``pl``.
        pl: the plan, with its alternatives.
    """
    out = []
    if not pl.feasible:
        over = pl.memory_bytes - pl.usable_memory_bytes
        if over > 0:
            if not pl.activation_checkpointing and inp.checkpointing is not None:
                out.append("turn on model.parallel.activation_checkpointing")
            limit = max_micro_batch(inp, pl.activation_checkpointing)
            if pl.micro_batch_size > 1 and limit >= 1:
                out.append(f"use optim.micro_batch_size ≤ {limit}")
            nodes = fitting_nodes(inp)
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
