"""What the planner works out for one configuration (:class:`Plan`) and for each variation
it compares (:class:`Alternative`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crucible.cluster.plan.comm import CommVolume
from crucible.cluster.plan.run_plan import RunPlan


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
    """Everything the planner worked out for one configuration on one cluster."""

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
    tokens: float
    run: RunPlan
    """What every rank runs: batch shape, steps, DeepSpeed config, memory per GPU."""
    gpu_memory_bytes: int
    usable_memory_bytes: int
    states_by_stage: dict[int, int]
    max_micro_batch_size: int
    compute_seconds: float
    memory_seconds: float
    fetch_seconds: float
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
    def micro_batch_size(self) -> int:
        """Sequences per GPU per forward."""
        return self.run.micro_batch_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.run.grad_accum_steps

    @property
    def steps(self) -> int:
        """Optimizer steps of the run."""
        return self.run.total_steps

    @property
    def memory_bytes(self) -> int:
        """Peak memory per GPU: model states + hpZ shard + activations + logits."""
        return self.run.memory.total_bytes

    @property
    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config of this plan: what every rank runs."""
        return self.run.ds_config
