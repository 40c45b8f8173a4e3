"""Loss-spike and NaN rollback: a step whose loss (or gradient norm) is not finite, or whose
loss spikes far above the recent ones, is not kept. Every rank reloads the last committed
checkpoint in-process, the reader steps over ``train.rollback_skip_batches`` global batches
from the bad one, and training goes on, the way PaLM and OPT recovered by hand.

The decision is one collective (a one-integer all-reduce per step), so every rank rolls back
at the same step. The skipped batches are recorded before the reload, in
``<run>/rollbacks.jsonl`` (with the split's sample indices, up to 4096, for ``crucible data
trace``), and every attempt of the run reads that log as it starts: a restart or a resume
from a checkpoint before the bad batch skips it too, so the data order stays a pure function
of the spec and that log. ``data.skip_batches`` in the spec skips batches the same way from
the start.

More than ``train.max_rollbacks`` rollbacks within ``train.rollback_window_steps`` steps, or no
committed checkpoint to go back to, stop the run as a non-finite loss always did: rank 0 writes
``<run>/nan.json`` and the driver turns it into one line.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from crucible.cluster.storage import JsonlLog, read_jsonl
from crucible.errors import CrucibleError
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks.base import Callback, TrainContext
from crucible.jobs.train.console import say

if TYPE_CHECKING:
    from crucible.jobs.train.callbacks.ledger import LedgerCallback
    from crucible.monitoring.metrics import TrainMetrics

ROLLBACKS = "rollbacks.jsonl"
SPIKE_FACTOR = 100.0  # train.test_spike_batches multiplies the loss by this
MAX_LISTED_SAMPLES = 4096  # a rollback's record lists the skipped sample indices up to this


@dataclass
class SpikeDetector:
    """Judges a step from its loss and gradient norm against the recent losses.

    Args:
        window: losses kept; spikes are judged once it is full (0: never).
        zscore: standard deviations above the window's mean ...
        ratio: ... and times that mean, that make a loss a spike.
    """

    window: int = 100
    zscore: float = 6.0
    ratio: float = 1.2
    losses: deque[tuple[int, float]] = field(default_factory=deque)

    def judge(self, loss: float, grad_norm: float | None) -> str | None:
        """What is wrong with the step (None: nothing).

        Args:
            loss: its loss, the mean over all ranks.
            grad_norm: its global gradient norm (None: the engine has none).
        """
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"grad norm became {grad_norm} (loss {loss:.4f})"
        if self.window and len(self.losses) >= self.window:
            values = [v for _, v in self.losses]
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            if loss > mean + self.zscore * std and loss > self.ratio * mean:
                return f"loss spiked to {loss:.4f} (last {len(values)}: {mean:.4f} ± {std:.4f})"
        return None

    def add(self, step: int, loss: float) -> None:
        """Keep a healthy step's loss."""
        self.losses.append((step, loss))
        while len(self.losses) > self.window:
            self.losses.popleft()

    def forget_after(self, step: int) -> None:
        """Drop the losses of steps after ``step`` (a rollback undid them)."""
        while self.losses and self.losses[-1][0] > step:
            self.losses.pop()


class RollbackCallback(Callback):
    """Judges every step (the loop calls :meth:`healthy`) and rolls a bad one back.

    Args:
        ctx: the rank's training context (reader open; the engine is built later).
        ledger: records the rollback's time (rank 0).
        metrics: counts rollbacks and skipped samples (None: no metrics).
        log: rank 0's ``metrics.jsonl`` (None elsewhere).
    """

    def __init__(
        self,
        ctx: TrainContext,
        ledger: LedgerCallback,
        metrics: TrainMetrics | None,
        log: JsonlLog | None,
    ) -> None:
        t = ctx.spec.train
        self.ctx, self.ledger, self.metrics, self.log = ctx, ledger, metrics, log
        self.detector = SpikeDetector(t.spike_window, t.spike_zscore, t.spike_ratio)
        self.gave_up = False
        self._file: JsonlLog | None = None
        box: list[Any] = [read_jsonl(ctx.run_dir / ROLLBACKS) if ctx.rank == 0 else None]
        if ctx.world > 1:
            dist.broadcast_object_list(box, src=0)  # one reading, the same on every rank
        self.history: list[dict[str, Any]] = box[0]
        ctx.reader.skip(ctx.spec.data.skip_batches)
        for r in self.history:
            ctx.reader.skip(range(*r["skip"]))
        if self.history and metrics is not None:
            g = ctx.spec.optim.global_batch_size
            skipped = sum(r["skip"][1] - r["skip"][0] for r in self.history) * g
            metrics.on_rollback(skipped, rollbacks=len(self.history))

    def on_start(self) -> None:
        t = self.ctx.spec.train
        if t.test_nan_batches or t.test_spike_batches:
            self.ctx.engine.module.register_forward_hook(self._poison)

    def _poison(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        """``train.test_*_batches``: spoil the training loss of those global batches."""
        t, batch = self.ctx.spec.train, self.ctx.reader.last_batch
        if not module.training or not isinstance(output, tuple) or output[1] is None:
            return None
        if batch in t.test_nan_batches:
            return output[0], output[1] * math.nan
        if batch in t.test_spike_batches:
            return output[0], output[1] * SPIKE_FACTOR
        return None

    def healthy(
        self, step: int, batch: int, loss: float, grad_norm: float | None, started: float
    ) -> bool:
        """Judge step ``step``: True keeps it. False: it was rolled back (the context's step
        and the reader are the checkpoint's), or the run gave up (:attr:`gave_up`).

        Args:
            step: steps done after this one.
            batch: the global batch it trained on.
            loss: its loss, the mean over all ranks.
            grad_norm: its global gradient norm (None: the engine has none).
            started: unix time the step began.
        """
        why = self.detector.judge(loss, None if grad_norm is None else float(grad_norm))
        flag = torch.tensor([int(why is not None)], dtype=torch.int32)
        if self.ctx.world > 1:
            if self.ctx.engine.device.type == "cuda":
                flag = flag.to(self.ctx.engine.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's doubt is every rank's
        if not int(flag.item()):
            self.detector.add(step, loss)
            return True
        self._roll_back(step, batch, loss, why or "another rank judged it bad", started)
        return False

    def _roll_back(self, step: int, batch: int, loss: float, why: str, started: float) -> None:
        ctx, t = self.ctx, self.ctx.spec.train
        recent = [r for r in self.history if r["step"] > step - t.rollback_window_steps]
        if len(recent) >= t.max_rollbacks:
            self._give_up(step, batch, loss, why, f"{len(recent)} rollback(s) in the last "
                          f"{t.rollback_window_steps} steps already, train.max_rollbacks "
                          f"{t.max_rollbacks}")  # fmt: skip
            return
        chosen = ckpt.choose_checkpoint(ctx.checkpoints, ctx.spec.checkpoint.verify, ctx.rank,
                                        ctx.world)  # fmt: skip
        if chosen is None:
            self._give_up(step, batch, loss, why, "no committed checkpoint to roll back to")
            return
        g = ctx.spec.optim.global_batch_size
        skip = (batch, batch + t.rollback_skip_batches)
        skipped = len(set(range(*skip)) - ctx.reader.skipped) * g  # new to the reader
        record = {
            "step": step, "batch_index": batch, "why": why, "loss": _json(loss),
            "to_step": int(ckpt.read_state(chosen[0])["step"]), "skip": list(skip),
            "samples": [skip[0] * g, skip[1] * g], "time": time.time(),
        }  # fmt: skip
        if (skip[1] - skip[0]) * g <= MAX_LISTED_SAMPLES:
            positions = (skip[1] - skip[0]) * g
            record["sample_indices"] = ctx.reader.stream_indices(skip[0] * g, positions).tolist()
        if ctx.rank == 0:  # before the reload: a crash now still skips the batches next time
            if self._file is None:
                self._file = JsonlLog(ctx.run_dir / ROLLBACKS)
            self._file.append(record, sync=True)
        self.history.append(record)
        ctx.reader.skip(range(*skip))
        self._reload(chosen)
        self.detector.forget_after(ctx.step)
        self._report(record, skipped, started)

    def _reload(self, chosen: tuple[Any, Any, dict[str, Any]]) -> None:
        from crucible.jobs.train.resume import restore

        ctx = self.ctx
        path, _, manifest = chosen
        if (int(manifest["world_size"]) != ctx.world) != ctx.engine.load_universal_checkpoint():
            # DeepSpeed fixes the checkpoint format when the engine is built: a new attempt
            # (Ray Train restarts the group) resumes from it and skips the batches just logged.
            raise CrucibleError(
                f"rolling back to {path.name} needs the engine rebuilt (it was written with "
                f"{manifest['world_size']} ranks, this attempt loaded another format); "
                "ending the attempt so that the next one resumes from it"
            )
        resumed = restore(ctx, chosen, ckpt.read_state(path))
        ctx.step = resumed.step

    def _report(self, record: dict[str, Any], skipped: int, started: float) -> None:
        ctx, now = self.ctx, time.time()
        self.ledger.on_rollback(started, now, record["to_step"], record["step"] - 1)
        if self.metrics is not None:
            self.metrics.on_rollback(skipped)
        if self.log is None:
            return
        b0, b1 = record["skip"]
        batches = f"global batch {b0}" if b1 == b0 + 1 else f"global batches {b0}–{b1 - 1}"
        say(
            f"step {record['step']}: {record['why']}; rolled back to step-{record['to_step']} "
            f"and skipping {batches} (samples {record['samples'][0]}–{record['samples'][1] - 1}"
            f"); rollback {len(self.history)} of at most {ctx.spec.train.max_rollbacks} in "
            f"{ctx.spec.train.rollback_window_steps} steps"
        )
        self.log.append(
            {"kind": "rollback", "step": record["step"], "to_step": record["to_step"],
             "loss": record["loss"], "why": record["why"], "skipped_batches": list(range(b0, b1)),
             "skipped_samples": skipped, "seconds": now - started, "time": now},
            sync=True,
        )  # fmt: skip

    def _give_up(self, step: int, batch: int, loss: float, why: str, because: str) -> None:
        """Write ``nan.json`` (the driver turns it into the run's one-line error)."""
        self.gave_up = True
        if self.ctx.rank != 0:
            return
        last = ckpt.latest_committed(self.ctx.checkpoints)
        g = self.ctx.spec.optim.global_batch_size
        (self.ctx.run_dir / "nan.json").write_json(
            {"step": step, "batch_index": batch, "loss": str(loss), "what": why,
             "samples": [batch * g, (batch + 1) * g], "gave_up": because,
             "last_checkpoint": last[0].uri if last else None},
        )  # fmt: skip

    def on_end(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None
