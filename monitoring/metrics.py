"""Crucible's Prometheus metrics and the two facades jobs call: :class:`TrainMetrics` and
:class:`DataMetrics`.

Names follow Prometheus conventions: one ``crucible_`` prefix, base units (seconds, bytes,
FLOP/s), ``_total`` counters, ratios in 0–1. The labels ``run``, ``job`` and ``rank`` are not
set here: they are target labels from discovery (see :mod:`.exporter`), so every series of a
process carries them. Global quantities (tokens, loss, MFU) are recorded by rank 0 only, so
``sum by (run)`` counts them once; per-device ones (step time, data wait, memory, NVML) by
every rank.

Every facade method is cheap (a few dict updates) and exception-safe: a metrics bug is logged
once and never reaches the training loop.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

from crucible.monitoring.data_metrics import DataMetrics
from crucible.monitoring.safe import never_raise

__all__ = ["STEP_BUCKETS", "DataMetrics", "TrainMetrics", "never_raise", "train_metrics_for"]

log = logging.getLogger(__name__)

# Step times from 10 ms (tiny CPU models) to 10 min (huge global batches), ~1.6× apart.
STEP_BUCKETS = tuple(round(0.01 * 1.6**i, 4) for i in range(30))


def _finite(x: float | None) -> float:
    return float(x) if x is not None else math.nan


class TrainMetrics:
    """What a training rank reports: call ``on_step`` after every optimizer step.

    MFU follows PaLM (Chowdhery et al. 2022, app. B): model FLOPs per token (no
    recomputation) × tokens/s ÷ (devices × peak FLOP/s per device). Hardware FLOP/s add the
    recomputed forward when activation checkpointing is on.

    Args:
        model_flops_per_token: ``crucible.model.accounting.model_flops_per_token(cfg, seq_len)``.
        hardware_flops_per_token: ``hardware_flops_per_token(cfg, seq_len, recompute)``.
        num_devices: data-parallel devices (world size) sharing each step's tokens.
        peak_flops_per_device: the device's peak (``peak.device_peak_flops()[1]``).
        rank: this worker's rank; global metrics are recorded by rank 0 only.
        total_steps: the run's step budget (for progress), if known.
        total_tokens: the run's token budget, if known.
        gpu_budget_seconds: device-second budget the cost alert compares against, if any.
        registry: where the metrics live (default: a fresh registry for this object).
    """

    def __init__(
        self,
        model_flops_per_token: float,
        hardware_flops_per_token: float,
        num_devices: int,
        peak_flops_per_device: float,
        rank: int = 0,
        total_steps: int | None = None,
        total_tokens: float | None = None,
        gpu_budget_seconds: float | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model_flops_per_token = float(model_flops_per_token)
        self.hardware_flops_per_token = float(hardware_flops_per_token)
        self.num_devices = max(1, int(num_devices))
        self.peak = float(peak_flops_per_device)
        self.is_global = rank == 0
        self._restarts = 0
        self.last_mfu: float | None = None  # for the loop's own log record
        self._cuda = _cuda_available()
        ProcessCollector(registry=r, namespace="crucible")
        # Global series live in rank 0's registry only; other ranks keep them unexported.
        g = r if self.is_global else CollectorRegistry()

        self.tokens = Counter("crucible_train_tokens", "Training tokens processed.", registry=g)
        self.samples = Counter(
            "crucible_train_samples", "Training sequences processed.", registry=g
        )
        self.steps = Counter("crucible_train_steps", "Optimizer steps taken.", registry=g)
        self.step = Gauge(
            "crucible_train_step", "Optimizer steps done so far in the run.", registry=g
        )
        self.step_seconds = Histogram(
            "crucible_train_step_seconds", "Wall time of one optimizer step.",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.data_wait = Counter(
            "crucible_train_data_wait_seconds", "Time steps waited for their batch.", registry=r
        )
        self.busy = Gauge(
            "crucible_train_rank_busy_seconds",
            "Median time per step this rank spent reading its batch and in the engine, "
            "over the last straggler-check window.", registry=r,
        )  # fmt: skip
        self.slowdown = Gauge(
            "crucible_train_rank_slowdown_ratio",
            "This rank's busy time over the median of the other ranks, last straggler check.",
            registry=r,
        )  # fmt: skip
        self.straggler = Gauge(
            "crucible_train_straggler",
            "1 while this rank is reported as a straggler, else 0.", registry=r,
        )  # fmt: skip
        self.loss = Gauge("crucible_train_loss", "Training loss of the last step.", registry=g)
        self.heldout = Gauge("crucible_train_heldout_loss", "Last held-out loss.", registry=g)
        self.heldout_accuracy = Gauge(
            "crucible_train_heldout_accuracy_ratio",
            "Last held-out accuracy: a reward model's answer pairs ordered right, a masked "
            "LM's masked tokens predicted right.",
            registry=g,
        )
        self.heldout_exact_match = Gauge(
            "crucible_train_heldout_exact_match_ratio",
            "Greedy exact match of the run's evaluation prompts (train.eval_prompts).",
            registry=g,
        )
        # NaN, not 0, where a run does not measure them
        self.heldout_accuracy.set(math.nan)
        self.heldout_exact_match.set(math.nan)
        self.lr = Gauge(
            "crucible_train_learning_rate", "Learning rate of the last step.", registry=g
        )
        self.grad_norm = Gauge("crucible_train_grad_norm", "Global gradient norm.", registry=g)
        self.model_flops = Gauge(
            "crucible_train_model_flops_per_second",
            "Model FLOP/s per device (PaLM count, no recomputation), last step.", registry=g,
        )  # fmt: skip
        self.hw_flops = Gauge(
            "crucible_train_hardware_flops_per_second",
            "Executed FLOP/s per device incl. recomputation, last step.", registry=g,
        )  # fmt: skip
        self.mfu = Gauge(
            "crucible_train_mfu_ratio", "Model FLOPs utilisation, last step.", registry=g
        )
        self.last_step_time = Gauge(
            "crucible_train_last_step_timestamp_seconds", "Unix time of the last step.", registry=g
        )
        self.restarts = Counter(
            "crucible_train_restarts", "Worker-group restarts of this run.", registry=g
        )
        self.rollbacks = Counter(
            "crucible_train_rollbacks",
            "Rollbacks to the last checkpoint after a loss spike or a non-finite loss.",
            registry=g,
        )
        self.skipped_samples = Counter(
            "crucible_train_skipped_samples", "Training sequences skipped by rollbacks.",
            registry=g,
        )  # fmt: skip
        self.ckpt_save = Counter(
            "crucible_checkpoint_save_seconds",
            "Time training was blocked by checkpoint saves (an asynchronous save's copy to "
            "host memory).", registry=g,
        )  # fmt: skip
        self.ckpt_write = Counter(
            "crucible_checkpoint_write_seconds",
            "Time spent writing, hashing and committing checkpoints (in the background, "
            "overlapping training, for asynchronous saves).", registry=g,
        )  # fmt: skip
        self.ckpt_bytes = Counter(
            "crucible_checkpoint_saved_bytes", "Bytes written to checkpoints.", registry=g
        )
        self.ckpt_saves = Counter("crucible_checkpoint_saves", "Checkpoints committed.", registry=g)
        self.ckpt_load = Counter(
            "crucible_checkpoint_load_seconds", "Time spent loading checkpoints.", registry=g
        )
        self.ckpt_load_bytes = Counter(
            "crucible_checkpoint_loaded_bytes", "Bytes read from checkpoints.", registry=g
        )
        self.ckpt_time = Gauge(
            "crucible_checkpoint_last_timestamp_seconds",
            "Unix time the last checkpoint was committed.", registry=g,
        )  # fmt: skip
        self.ckpt_step = Gauge(
            "crucible_checkpoint_last_step", "Step of the last committed checkpoint.", registry=g
        )
        if self._cuda:
            self.mem_alloc = Gauge(
                "crucible_device_memory_allocated_bytes", "torch.cuda allocated memory.", registry=r
            )
            self.mem_peak = Gauge(
                "crucible_device_memory_peak_bytes", "torch.cuda peak allocated memory.", registry=r
            )
            from crucible.monitoring.nvml import nvml_collector

            nvml = nvml_collector()
            if nvml is not None:
                r.register(nvml)
        Gauge("crucible_device_peak_flops", "Peak FLOP/s of one device.", registry=r).set(self.peak)
        constants: dict[str, tuple[str, float]] = {}
        if self.is_global:
            constants["crucible_train_model_flops_per_token"] = (
                "Model FLOPs per token (6N + 12LHQT).",
                self.model_flops_per_token,
            )
            constants["crucible_train_devices"] = (
                "Devices training this run.",
                float(self.num_devices),
            )
            if total_steps is not None:
                constants["crucible_train_target_steps"] = ("Step budget.", float(total_steps))
            if total_tokens is not None:
                constants["crucible_train_target_tokens"] = ("Token budget.", float(total_tokens))
            if gpu_budget_seconds is not None:
                constants["crucible_gpu_budget_seconds"] = (
                    "Device-seconds budget of the run.", float(gpu_budget_seconds))  # fmt: skip
        for name, (doc, value) in constants.items():
            Gauge(name, doc, registry=r).set(value)

    @never_raise
    def on_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens: int,
        samples: int,
        step_seconds: float,
        data_wait_seconds: float = 0.0,
    ) -> None:
        """Record one optimizer step.

        Args:
            step: steps done after this one.
            loss: the step's (all-reduced) training loss.
            lr: learning rate used.
            grad_norm: global gradient norm (None if unknown).
            tokens: tokens in the global batch of this step.
            samples: sequences in the global batch.
            step_seconds: wall time of the step, data wait included.
            data_wait_seconds: part of ``step_seconds`` spent waiting for the batch.
        """
        self.step_seconds.observe(step_seconds)
        self.data_wait.inc(max(0.0, data_wait_seconds))
        if self._cuda:
            import torch

            self.mem_alloc.set(torch.cuda.memory_allocated())
            self.mem_peak.set(torch.cuda.max_memory_allocated())
        if not self.is_global:
            return
        self.tokens.inc(tokens)
        self.samples.inc(samples)
        self.steps.inc()
        self.step.set(step)
        self.loss.set(_finite(loss))
        self.lr.set(lr)
        self.grad_norm.set(_finite(grad_norm))
        if step_seconds > 0:
            tok_s_device = tokens / step_seconds / self.num_devices
            self.model_flops.set(self.model_flops_per_token * tok_s_device)
            self.hw_flops.set(self.hardware_flops_per_token * tok_s_device)
            self.last_mfu = self.model_flops_per_token * tok_s_device / self.peak
            self.mfu.set(self.last_mfu)
        self.last_step_time.set(time.time())

    @never_raise
    def on_straggler_check(self, busy_seconds: float, ratio: float, straggler: bool) -> None:
        """Record this rank's result of a straggler check.

        Args:
            busy_seconds: the rank's median busy seconds per step over the window.
            ratio: that over the median of all ranks.
            straggler: the rank is reported as a straggler.
        """
        self.busy.set(busy_seconds)
        self.slowdown.set(ratio)
        self.straggler.set(1.0 if straggler else 0.0)

    @never_raise
    def on_eval(
        self, loss: float, accuracy: float | None = None, exact_match: float | None = None
    ) -> None:
        """Record a held-out loss.

        Args:
            loss: token-weighted held-out loss (a reward model's ranking loss).
            accuracy: a reward model's share of held-out answer pairs ordered right.
            exact_match: greedy exact match of the run's evaluation prompts.
        """
        if self.is_global:
            self.heldout.set(_finite(loss))
            if accuracy is not None:
                self.heldout_accuracy.set(_finite(accuracy))
            if exact_match is not None:
                self.heldout_exact_match.set(_finite(exact_match))

    @never_raise
    def on_checkpoint(
        self, step: int, save_seconds: float, nbytes: int, write_seconds: float | None = None
    ) -> None:
        """Record a committed checkpoint.

        Args:
            step: the checkpoint's step.
            save_seconds: time training was blocked by the save.
            nbytes: bytes written (all ranks).
            write_seconds: time writing, hashing and committing it (None: ``save_seconds``,
                a synchronous save).
        """
        if not self.is_global:
            return
        self.ckpt_save.inc(save_seconds)
        self.ckpt_write.inc(save_seconds if write_seconds is None else write_seconds)
        self.ckpt_bytes.inc(nbytes)
        self.ckpt_saves.inc()
        self.ckpt_time.set(time.time())
        self.ckpt_step.set(step)

    @never_raise
    def on_load(self, load_seconds: float, nbytes: int) -> None:
        """Record a checkpoint load (resume).

        Args:
            load_seconds: time to load and restore.
            nbytes: checkpoint size.
        """
        if self.is_global:
            self.ckpt_load.inc(load_seconds)
            self.ckpt_load_bytes.inc(nbytes)

    @never_raise
    def on_rollback(self, skipped_samples: int, rollbacks: int = 1) -> None:
        """Record rollbacks (the ones before this attempt too, as it starts).

        Args:
            skipped_samples: the training sequences they skipped.
            rollbacks: how many.
        """
        if self.is_global:
            self.rollbacks.inc(rollbacks)
            self.skipped_samples.inc(skipped_samples)

    @never_raise
    def on_restart(self, restarts: int | None = None) -> None:
        """Record that this attempt is a restart.

        Args:
            restarts: restarts of the run so far (e.g. attempt index - 1); the counter is
                raised to this total. None counts one more.
        """
        if not self.is_global:
            return
        total = self._restarts + 1 if restarts is None else max(self._restarts, restarts)
        self.restarts.inc(total - self._restarts)
        self._restarts = total


def train_metrics_for(
    cfg: Any,
    seq_len: int,
    num_devices: int,
    rank: int = 0,
    recompute: bool = False,
    peak_flops_per_device: float | None = None,
    **kwargs: Any,
) -> TrainMetrics:
    """:class:`TrainMetrics` for a model shape; the device peak is looked up (or measured).

    Args:
        cfg: the ``ModelConfig`` being trained.
        seq_len: training sequence length.
        num_devices: data-parallel devices.
        rank: this worker's rank.
        recompute: activation checkpointing on (hardware FLOPs add a forward).
        peak_flops_per_device: override the catalogue / CPU measurement.
        **kwargs: passed to :class:`TrainMetrics` (total_steps, total_tokens, ...).
    """
    from crucible.model.accounting import hardware_flops_per_token, model_flops_per_token
    from crucible.monitoring.peak import device_peak_flops

    peak = peak_flops_per_device or device_peak_flops()[1]
    return TrainMetrics(
        model_flops_per_token(cfg, seq_len),
        hardware_flops_per_token(cfg, seq_len, recompute),
        num_devices,
        peak,
        rank=rank,
        **kwargs,
    )


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False
