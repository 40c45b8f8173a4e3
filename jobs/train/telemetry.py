"""What a training rank tells the outside world: Prometheus metrics, the GPU-hours ledger and
the hang watchdog, behind one exception-safe object the train loop calls once per event.

Every rank serves its metrics on its node's address (registered with the cluster's target
registry, from which Prometheus discovers them; see :mod:`crucible.monitoring.discovery`) and
runs a watchdog; rank 0 alone records the run-wide series and writes the ledger for all
devices of the attempt. Nothing here touches torch's random generators or the tensors being
trained, and no failure in here reaches the loop: metrics never break training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from crucible.cluster.storage import Location, cache_key, scratch_dir
from crucible.monitoring.metrics import never_raise

log = logging.getLogger(__name__)


def shared_peak_flops(rank: int) -> tuple[str, float]:
    """The device and its peak FLOP/s, measured by rank 0 alone and broadcast.

    On a CPU the peak is a timed matmul (cached per machine): ranks measuring at once on
    shared cores would each see a fraction of it. The measurement draws random matrices, so
    it runs on a forked RNG: the training streams stay bitwise as they were.

    Args:
        rank: this rank (the process group must be initialised).
    """
    import torch
    import torch.distributed as dist

    from crucible.monitoring.peak import device_peak_flops

    box: list[Any] = [("unknown", math.nan)]
    if rank == 0:
        try:  # every rank must reach the broadcast, whatever the measurement does
            with torch.random.fork_rng(devices=[]):
                box[0] = device_peak_flops()
        except Exception:
            log.exception("telemetry: no device peak FLOP/s; MFU is NaN")
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Telemetry:
    """Metrics, ledger and watchdog of one training rank (see the module docstring).

    Args:
        spec: the train spec.
        plan: this attempt's plan.
        run_dir: the run directory.
        rank: this rank.
        world: ranks of this attempt.
        resumed_from: step of the checkpoint this attempt resumed from (0: fresh start).
        on_hang: what a hang does after the stacks are dumped (default: exit the process,
            which fails the attempt so Ray Train restarts it from the last checkpoint).
    """

    def __init__(
        self,
        spec: Any,
        plan: Any,
        run_dir: Location,
        rank: int,
        world: int,
        resumed_from: int,
        on_hang: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.metrics: Any = None
        self.ledger: Any = None
        self.watchdog: Any = None
        self.port: int | None = None
        self.device = ""
        self._on_hang = on_hang or (lambda: os._exit(1))
        peak = self._peak()
        self._start_ledger(world, resumed_from)
        self._start_metrics(spec, plan, world, peak)

    @never_raise
    def _peak(self) -> float | None:
        self.device, peak = shared_peak_flops(self.rank)
        return float(peak)

    @never_raise
    def _start_ledger(self, world: int, resumed_from: int) -> None:
        if self.rank != 0:
            return
        from crucible.monitoring.ledger import LedgerWriter

        self.ledger = LedgerWriter(
            self.run_dir, world, resumed_from=resumed_from, device=self.device
        )

    @never_raise
    def _start_metrics(self, spec: Any, plan: Any, world: int, peak: float | None) -> None:
        from crucible.monitoring.exporter import start_exporter
        from crucible.monitoring.ledger import LedgerCollector
        from crucible.monitoring.metrics import train_metrics_for

        budget = spec.train.gpu_hour_budget
        self.metrics = train_metrics_for(
            spec.model.resolve(),
            plan.seq_len,
            num_devices=world,
            rank=self.rank,
            recompute=spec.model.parallel.activation_checkpointing,
            peak_flops_per_device=peak or math.nan,  # never re-measured off the forked RNG
            total_steps=plan.total_steps,
            total_tokens=spec.train.max_tokens,
            gpu_budget_seconds=budget * 3600 if budget else None,
        )
        if self.rank == 0:
            self.metrics.registry.register(LedgerCollector(self.run_dir))
            if self.ledger is not None and self.ledger.attempt > 1:
                self.metrics.on_restart(restarts=self.ledger.attempt - 1)
        self.port = start_exporter(spec.name, "train", self.rank, self.metrics.registry)

    @never_raise
    def loaded(self, seconds: float, nbytes: int) -> None:
        """A checkpoint was loaded (resume).

        Args:
            seconds: load and restore time.
            nbytes: the checkpoint's size.
        """
        if self.metrics is not None:
            self.metrics.on_load(seconds, nbytes)

    @never_raise
    def started(self, timeout_s: float) -> None:
        """Start-up is over (the first step begins now): close the start-up interval and start
        the watchdog.

        Args:
            timeout_s: seconds without a step that count as a hang (0: no watchdog).
        """
        if self.ledger is not None:
            self.ledger.startup_done()
        if timeout_s > 0:
            from crucible.monitoring.watchdog import Watchdog

            # dumped locally first (a hang may be the storage's), then copied to the run
            local = scratch_dir("stacks", cache_key(self.run_dir.uri)) / f"rank-{self.rank}.log"
            remote = self.run_dir / "workers" / f"rank-{self.rank}.stacks.log"

            def on_hang() -> None:
                with contextlib.suppress(Exception):
                    remote.upload(local)
                self._on_hang()

            self.watchdog = Watchdog(timeout_s, local, on_hang=on_hang).start()

    @never_raise
    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        samples: int,
        t0: float,
        seconds: float,
        data_wait_s: float,
    ) -> float | None:
        """Record one optimizer step; return its MFU (rank 0; None elsewhere).

        Args:
            step: steps done after this one.
            loss: all-reduced training loss.
            lr: learning rate used.
            grad_norm: global gradient norm.
            tokens: tokens in the global batch.
            samples: sequences in the global batch.
            t0: unix time the step began (its batch read included).
            seconds: its duration (from a monotonic clock: MFU and the log use the same
                figure, to the bit).
            data_wait_s: part of it spent waiting for the batch.
        """
        if self.watchdog is not None:
            self.watchdog.progress()
        if self.ledger is not None:
            self.ledger.step(step, t0, t0 + seconds, data_wait_s)
        if self.metrics is None:
            return None
        self.metrics.on_step(step, loss, lr, grad_norm, tokens, samples, seconds, data_wait_s)
        mfu = self.metrics.last_mfu
        return mfu if self.rank == 0 and mfu is not None and math.isfinite(mfu) else None

    @never_raise
    def evaluated(self, loss: float, t0: float, t1: float) -> None:
        """A held-out evaluation ran from ``t0`` to ``t1``.

        Args:
            loss: held-out loss.
            t0: unix start.
            t1: unix end.
        """
        if self.watchdog is not None:
            self.watchdog.progress()
        if self.ledger is not None:
            self.ledger.interval("eval", t0, t1)
        if self.metrics is not None:
            self.metrics.on_eval(loss)

    @never_raise
    def checkpointed(self, step: int, save_seconds: float, nbytes: int, t0: float) -> None:
        """A checkpoint was committed; the ledger's interval runs from ``t0`` to now (the save,
        retention and Ray Train's report).

        Args:
            step: the checkpoint's step.
            save_seconds: save-to-commit time.
            nbytes: bytes written by all ranks.
            t0: unix time the save began.
        """
        if self.watchdog is not None:
            self.watchdog.progress()
        if self.ledger is not None:
            self.ledger.checkpoint(step, t0, time.time(), committed=True)
        if self.metrics is not None:
            self.metrics.on_checkpoint(step, save_seconds, nbytes)

    @never_raise
    def ledger_state(self, use_gpu: bool) -> dict[str, Any]:
        """The ledger so far, for the checkpoint's state (rank 0; empty elsewhere): device-
        seconds by phase as :func:`~crucible.monitoring.ledger.account` reads them.

        Args:
            use_gpu: whether the devices are GPUs (``gpu_seconds`` is 0 on CPU workers).
        """
        if self.rank != 0:
            return {}
        from crucible.monitoring.ledger import account

        s = account(self.run_dir, stale_after_s=math.inf)
        return {
            "worker_seconds": s.total_seconds,
            "gpu_seconds": s.total_seconds if use_gpu else 0.0,
            "seconds": s.seconds,
            "attempts": s.attempts,
        }

    @never_raise
    def finish(self, status: str) -> None:
        """The attempt is over: stop the watchdog and the exporter, close the ledger.

        Args:
            status: ``finished`` (the run is done) or ``failed``.
        """
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.ledger is not None:
            self.ledger.end(status)
        if self.port is not None:
            from crucible.monitoring.exporter import stop_exporter

            stop_exporter(self.port)
            self.port = None
