"""TensorBoard: rank 0 writes each step's scalars as event files in ``<run>/tensorboard``
(``monitoring.loggers: [tensorboard]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.callbacks.mirror import MirroredDir
from crucible.jobs.train.checkpoint import SaveStats
from crucible.monitoring.safe import never_raise

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

DIR = "tensorboard"


class TensorBoardCallback(Callback):
    """Scalars per step: ``train/*`` (loss, lr, grad norm, throughput, MFU) and
    ``eval/heldout_loss``. An attempt that resumed purges the steps it runs again.

    Args:
        ctx: the rank's training context.
    """

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.dir: MirroredDir | None = None
        self.writer: SummaryWriter | None = None

    @never_raise
    def on_start(self) -> None:
        if self.ctx.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.dir = MirroredDir(self.ctx.run_dir, DIR)
        # a resumed attempt re-runs the steps after its checkpoint: TensorBoard drops the
        # earlier attempt's events from purge_step on
        purge = self.ctx.step + 1 if self.ctx.step else None
        self.writer = SummaryWriter(log_dir=str(self.dir.local), purge_step=purge)

    @never_raise
    def on_step_end(self, result: StepResult) -> None:
        if self.writer is None:
            return
        for tag, value in result.scalars().items():
            self.writer.add_scalar(tag, value, result.step)

    @never_raise
    def on_save(self, stats: SaveStats, t0: float) -> None:
        if self.writer is not None and self.dir is not None:
            self.writer.flush()
            self.dir.sync()

    @never_raise
    def on_end(self, status: str) -> None:
        if self.writer is not None and self.dir is not None:
            self.writer.close()
            self.dir.sync()
            self.writer = None
