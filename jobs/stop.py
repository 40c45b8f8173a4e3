"""Stopping a run's job: gracefully for a train run (its workers finish the current step,
save it and exit, before this returns), through the Jobs API for everything else."""

from __future__ import annotations

import time

from crucible.cluster.storage import location, read_jsonl
from crucible.jobs.client import TERMINAL, JobsClient
from crucible.jobs.runs import stop_request
from crucible.jobs.spec import TRAINING_KINDS


def stop_job(
    client: JobsClient, job_id: str, checkpoint: bool = True, timeout_s: float = 600.0
) -> str:
    """Stop job ``job_id``; return one line saying how it ended.

    A train run's job is asked to stop through ``<run>/control/stop.json``: its ranks end
    after their current step (saved, unless ``checkpoint`` is false) and the job ends by
    itself. Only if it has not ended within ``timeout_s`` (or is not a train run) is it
    stopped through the Jobs API, which ends the driver at once.

    Args:
        client: the cluster's jobs client.
        job_id: the job.
        checkpoint: save the step the run stops at.
        timeout_s: how long to wait for the graceful stop.
    """
    info = client.info(job_id)
    if info.status in TERMINAL:
        return f"{job_id}: already {info.status.value}"
    meta = info.metadata or {}
    run_dir = meta.get("run_dir")
    if meta.get("crucible_kind") not in TRAINING_KINDS or not run_dir:
        client.stop(job_id)
        return f"{job_id}: stop requested"
    run = location(run_dir)
    stop_request(run).write_json({"job": job_id, "checkpoint": checkpoint, "at": time.time()})
    status = client.wait(job_id, timeout=timeout_s)
    if status not in TERMINAL:
        client.stop(job_id)
        client.wait(job_id, timeout=60)
        return (
            f"{job_id}: did not stop within {timeout_s:.0f} s of the request; stopped through "
            "the Jobs API (the steps since its last checkpoint are lost)"
        )
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "step"]
    at = f" at step {steps[-1]['step']}" if steps else ""
    saved = " (saved)" if checkpoint else ""
    return f"{job_id}: run {run.name} stopped{at}{saved}; its workers have exited"
