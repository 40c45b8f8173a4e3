"""The one planner: what a training run needs and costs, and what every rank runs.

Given a model, a cluster and a batch, :func:`plan` works out the per-GPU memory
(:mod:`.memory`: ZeRO model states exactly as DeepSpeed estimates them, activations per
Korthikanti et al. 2022, logits), picks the micro-batch and activation checkpointing that fit
and run fastest (:mod:`.fit`), predicts the step time from the matmuls' FLOPs, the other
kernels' HBM traffic, ZeRO-3's per-module fetches and its communication (:mod:`.step_time`,
:mod:`.traffic`, :mod:`.comm`), and compares the alternatives
(:mod:`.alternatives`). :func:`plan_run` gives what the train job runs (:mod:`.run_plan`: batch
shape, steps, DeepSpeed config), the same object as :attr:`Plan.run`; :mod:`.render` prints
a plan. ``crucible plan``, ``crucible train run --dry-run`` and the train job all use it.
"""

from crucible.cluster.plan.api import (
    TrainRun,
    optimizer_section,
    plan,
    plan_from_spec,
    plan_run,
    resolve_accelerator,
)
from crucible.cluster.plan.memory import GiB, format_bytes
from crucible.cluster.plan.result import Alternative, Plan
from crucible.cluster.plan.run_plan import RunPlan
from crucible.cluster.plan.step_time import StepModel

__all__ = [
    "Alternative",
    "GiB",
    "Plan",
    "RunPlan",
    "StepModel",
    "TrainRun",
    "format_bytes",
    "optimizer_section",
    "plan",
    "plan_from_spec",
    "plan_run",
    "resolve_accelerator",
]
