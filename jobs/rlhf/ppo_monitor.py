"""What a PPO run tells the monitoring: rank 0's GPU-hours ledger of the attempt, and every
rank's Prometheus metrics (:class:`~crucible.monitoring.ppo_metrics.PPOMetrics`), served on
the rank's node and found by the cluster's Prometheus as a training rank's are. Neither can
stop the job."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crucible.monitoring.safe import never_raise

if TYPE_CHECKING:
    from crucible.jobs.rlhf.ppo_worker import PPOWorker
    from crucible.monitoring.ledger import LedgerWriter
    from crucible.monitoring.ppo_metrics import PPOMetrics


def open_ledger(worker: PPOWorker) -> LedgerWriter | None:
    """Rank 0's ledger of this attempt, with every device of the attempt in it (the
    separate frozen models' actors too): start-up to
    the first step, each PPO step (rollout, scoring and updates) and each checkpoint save;
    ``crucible report`` turns it into goodput and cost. None on the other ranks.

    Args:
        worker: the rank's PPO worker, resumed (its step is the attempt's first).
    """
    if worker.rank != 0:
        return None
    from crucible.monitoring.ledger import LedgerWriter

    cuda = worker.device.type == "cuda"
    device = torch.cuda.get_device_name(worker.device) if cuda else "cpu"
    f = worker.spec.frozen
    devices = worker.world + (f.num_actors if f.placement == "separate" else 0)
    ledger = LedgerWriter(worker.run_dir, devices, resumed_from=worker.step, device=device)
    ledger.startup_done()
    return ledger


@never_raise
def start_metrics(worker: PPOWorker) -> tuple[PPOMetrics, int | None]:
    """The rank's metrics (label ``job="ppo"``) and the port serving them; rank 0's carry
    the run's GPU-hours ledger (``crucible_gpu_seconds_total``). None on any failure.

    Args:
        worker: the rank's PPO worker.
    """
    from crucible.monitoring.exporter import start_exporter
    from crucible.monitoring.ledger import LedgerCollector
    from crucible.monitoring.ppo_metrics import PPOMetrics

    metrics = PPOMetrics(worker.rank, worker.spec.ppo.steps)
    if worker.rank == 0:
        metrics.registry.register(LedgerCollector(worker.run_dir))
    return metrics, start_exporter(worker.spec.name, "ppo", worker.rank, metrics.registry)


@never_raise
def stop_metrics(port: int, rank: int) -> None:
    """Stop serving; rank 0 first waits for one more scrape, which carries its last values.

    Args:
        port: the exporter's port.
        rank: the worker's rank.
    """
    from crucible.jobs.train.callbacks.prometheus import FINAL_SCRAPE_S
    from crucible.monitoring.exporter import stop_exporter

    stop_exporter(port, final_scrape_s=FINAL_SCRAPE_S if rank == 0 else 0.0)
