"""Which launcher started this rank, and the two things the loop asks of it: the rank's place
in the group, and the report of each checkpoint.

The train job runs its ranks under Ray Train's ``TorchTrainer``; on one node without Ray (the
GPU check, a debugging session) :mod:`crucible.jobs.train.standalone` runs the same loop
under ``torchrun``, which marks its workers with ``TORCHELASTIC_RUN_ID``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Launcher:
    """This rank's group, as its launcher set it up."""

    name: str
    """``ray`` or ``torchrun``."""
    rank: int
    world_size: int
    local_rank: int

    def report(self, metrics: dict[str, Any]) -> None:
        """Tell the launcher a checkpoint is committed (Ray Train's controller records it;
        torchrun has no controller to tell)."""
        if self.name == "ray":
            import ray.train

            ray.train.report(metrics)


def current_launcher() -> Launcher:
    """The launcher of this process: ``torchrun`` where it set ``TORCHELASTIC_RUN_ID``,
    else Ray Train (whose context fails loudly outside a ``TorchTrainer``)."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return Launcher(
            "torchrun",
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    import ray.train

    ctx = ray.train.get_context()
    return Launcher("ray", ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
