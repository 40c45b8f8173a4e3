"""The plan as a report a cluster owner can act on (rich tables, for `crucible plan`)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from crucible.cluster.plan.memory import GiB, format_bytes
from crucible.cluster.plan.result import Plan


def _gib(n: float) -> str:
    return format_bytes(n, digits=1)


def _zero_knobs(pl: Plan) -> str:
    knobs = [f"ZeRO-{pl.zero_stage}"]
    if pl.offload_optimizer:
        knobs.append("optimizer offload")
    if pl.offload_params:
        knobs.append("parameter offload")
    if pl.hpz_partition_size > 1:
        knobs.append(f"hpZ {pl.hpz_partition_size}")
    if pl.quantized_weights:
        knobs.append("qwZ")
    if pl.quantized_gradients:
        knobs.append("qgZ")
    return " + ".join(knobs)


def _memory_table(pl: Plan) -> Table:
    mem = pl.run.memory
    t = Table(title="memory per GPU", title_justify="left", show_header=True)
    t.add_column("item")
    t.add_column("bytes", justify="right")
    t.add_row(f"model states ({_zero_knobs(pl)}, DeepSpeed's estimate)", _gib(mem.state_bytes))
    if mem.hpz_bytes:
        t.add_row("ZeRO++ hpZ secondary weight shard", _gib(mem.hpz_bytes))
    ck = "on" if pl.activation_checkpointing else "off"
    t.add_row(
        f"activations (micro-batch {pl.micro_batch_size}, checkpointing {ck})",
        _gib(mem.activation_bytes),
    )
    t.add_row("output logits + loss", _gib(mem.logits_bytes))
    t.add_row("total", _gib(pl.memory_bytes), style="bold")
    t.add_row(
        f"usable on {pl.gpu} ({_gib(pl.gpu_memory_bytes)} less headroom)",
        _gib(pl.usable_memory_bytes),
    )
    for stage, nbytes in pl.states_by_stage.items():
        t.add_row(f"  model states at ZeRO-{stage} (same offload)", _gib(nbytes), style="dim")
    t.add_row("CPU memory per node for model states", _gib(mem.state_cpu_bytes_per_node))
    return t


def _time_table(pl: Plan) -> Table:
    t = Table(title="time and cost", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row(
        "batch",
        f"{pl.run.global_batch_size:,} × {pl.run.seq_len:,} tokens = micro-batch "
        f"{pl.micro_batch_size} × {pl.grad_accum_steps} accumulation × {pl.num_gpus:,} GPUs",
    )
    t.add_row("largest micro-batch that fits", str(pl.max_micro_batch_size))
    t.add_row("steps", f"{pl.steps:,} ({pl.tokens:,.3g} tokens)")
    t.add_row("matmuls and attention per step", f"{pl.compute_seconds:,.2f} s")
    if pl.memory_seconds:
        t.add_row(
            "memory-bound kernels per step (norms, loss, Adam, ...)", f"{pl.memory_seconds:,.2f} s"
        )
    if pl.fetch_seconds:
        t.add_row("ZeRO-3 per-module fetches per step", f"{pl.fetch_seconds:,.2f} s")
    cross = pl.comm.inter_node_bytes / GiB
    intra = pl.comm.intra_node_bytes / GiB
    t.add_row(
        "ZeRO communication per step",
        f"{pl.comm_seconds:,.2f} s ({cross:,.1f} GiB across nodes, {intra:,.1f} GiB NVLink)",
    )
    if pl.offload_seconds:
        t.add_row("offload transfers per step", f"{pl.offload_seconds:,.2f} s")
    t.add_row("step time", f"{pl.step_seconds:,.2f} s ({pl.bound}-bound)")
    t.add_row("MFU / hardware TFLOP/s per GPU", f"{pl.mfu:.1%} / {pl.hardware_tflops_per_gpu:,.0f}")
    t.add_row("wall time", f"{pl.days:,.1f} days")
    t.add_row("GPU-hours", f"{pl.gpu_hours:,.0f}")
    t.add_row("energy (GPU power × PUE)", f"{pl.energy_mwh:,.1f} MWh")
    t.add_row("cost", f"${pl.cost_usd:,.0f} at ${pl.usd_per_gpu_hour:.2f}/GPU-hour (assumed)")
    return t


def _alternatives_table(pl: Plan) -> Table:
    t = Table(title="what other choices give", title_justify="left")
    for col in ("change", "fits", "micro×accum", "step s", "bound", "MFU", "days", "$"):
        t.add_column(col, justify="left" if col == "change" else "right")
    for a in pl.alternatives:
        t.add_row(
            a.change,
            "yes" if a.feasible else "no",
            f"{a.micro_batch_size}×{a.grad_accum_steps}",
            f"{a.step_seconds:,.1f}",
            a.bound,
            f"{a.mfu:.0%}",
            f"{a.days:,.1f}",
            f"{a.cost_usd:,.0f}",
        )
    return t


def plan_renderable(pl: Plan) -> RenderableType:
    """The report as a rich renderable (for printing to a terminal).

    Args:
        pl: the plan.
    """
    peak = f"{pl.peak_flops / 1e12:,.1f} TFLOP/s" + (" measured" if pl.peak_measured else "")
    head = Text(
        f"{pl.model}: {pl.params / 1e9:,.2f}B parameters on {pl.nodes} × {pl.gpus_per_node} "
        f"{pl.gpu} ({pl.num_gpus:,} GPUs, {peak} each), {_zero_knobs(pl)}\n",
        style="bold",
    )
    verdict = (
        Text("FEASIBLE\n", style="bold green")
        if pl.feasible
        else Text(
            "NOT FEASIBLE:\n" + "\n".join(f"  - {p}" for p in pl.problems) + "\n", style="bold red"
        )
    )
    parts: list[RenderableType] = [head, verdict, _memory_table(pl), _time_table(pl)]
    if pl.alternatives:
        parts.append(_alternatives_table(pl))
    if pl.advice:
        parts.append(Text("what helps:\n" + "\n".join(f"  - {a}" for a in pl.advice)))
    if pl.notes:
        parts.append(Text("notes:\n" + "\n".join(f"  - {n}" for n in pl.notes)))
    return Group(*parts)
