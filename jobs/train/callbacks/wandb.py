"""Weights & Biases in offline mode: rank 0 logs each step's scalars to a run under
``<run>/wandb`` (``monitoring.loggers: [wandb]``); ``wandb sync`` uploads it later, from a
machine with network. Training never needs the network for it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.callbacks.mirror import MirroredDir
from crucible.jobs.train.checkpoint import SaveStats
from crucible.monitoring.safe import never_raise

if TYPE_CHECKING:
    from wandb import Run

DIR = "wandb"


class WandbCallback(Callback):
    """One offline W&B run per attempt, grouped by the crucible run's name, with the resolved
    spec as its config.

    Args:
        ctx: the rank's training context.
    """

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.dir: MirroredDir | None = None
        self.run: Run | None = None

    @never_raise
    def on_start(self) -> None:
        if self.ctx.rank != 0:
            return
        os.environ["WANDB_MODE"] = "offline"  # also for anything wandb starts
        import wandb

        spec = self.ctx.spec
        self.dir = MirroredDir(self.ctx.run_dir, DIR)
        self.run = wandb.init(
            project="crucible",
            group=spec.name,
            name=f"{spec.name}@{self.ctx.step}",
            dir=str(self.dir.local),
            mode="offline",
            config=spec.model_dump(mode="json"),
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )

    @never_raise
    def on_step_end(self, result: StepResult) -> None:
        if self.run is None:
            return
        self.run.log(result.scalars(), step=result.step)

    @never_raise
    def on_save(self, stats: SaveStats, t0: float) -> None:
        if self.dir is not None:
            self.dir.sync()

    @never_raise
    def on_end(self, status: str) -> None:
        if self.run is not None and self.dir is not None:
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.dir.sync()
            self.run = None
