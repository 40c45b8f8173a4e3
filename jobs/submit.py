"""Submitting a run as a Ray job and following it to the end."""

from __future__ import annotations

import shlex
import sys
import time

from crucible.cluster.storage import JsonlLog, Location, read_jsonl
from crucible.errors import CrucibleError
from crucible.jobs.client import JobsClient
from crucible.jobs.preflight import preflight
from crucible.jobs.runs import prepare_run, run_location, stop_request
from crucible.jobs.spec import RunSpec

ACTIVE = {"PENDING", "RUNNING"}


def active_job(client: JobsClient, run_name: str) -> str | None:
    """The submission id of a pending/running job of ``run_name`` on the cluster, if any."""
    for job in client.list():
        meta = job.metadata or {}
        if meta.get("crucible_run") == run_name and str(job.status) in ACTIVE | {
            f"JobStatus.{s}" for s in ACTIVE
        }:
            return job.submission_id
    return None


def wait_for_workers_to_exit(
    client: JobsClient, run: Location, wait_s: float = 60.0, poll_s: float = 1.0
) -> None:
    """Before a resume: wait until the run's previous job has no live actor left, since its
    workers would otherwise train on beside the new ones and write into the same checkpoints.

    Args:
        client: the cluster's jobs client.
        run: the run directory (its ``jobs.jsonl`` names the previous job).
        wait_s: how long to wait for them to exit before refusing.
        poll_s: how often to look.

    Raises:
        CrucibleError: workers of the previous job are still alive after ``wait_s``.
    """
    history = read_jsonl(run / "jobs.jsonl")
    if not history:
        return
    previous = str(history[-1]["job"])
    if not any(job.submission_id == previous for job in client.list()):
        return  # submitted to another cluster (or one since restarted): nothing of it runs here
    deadline = time.monotonic() + wait_s
    said = False
    while alive := client.live_actors(previous):
        if time.monotonic() >= deadline:
            raise CrucibleError(
                f"{len(alive)} actor{'s' * (len(alive) > 1)} of run {run.name!r}'s previous job "
                f"{previous} {'are' if len(alive) > 1 else 'is'} still alive ({', '.join(sorted(set(alive)))}) and would train beside the resumed "
                "run; resume again once they have exited"
            )
        if not said:
            print(f"waiting for {len(alive)} actors of job {previous} to exit", flush=True)
            said = True
        time.sleep(poll_s)


def submit_run(
    spec: RunSpec, resume: bool = False, verbose: bool = False, linger_wait_s: float = 60.0
) -> tuple[JobsClient, str, Location]:
    """Prepare the run directory and submit the run's job; return (client, job id, run dir).

    Args:
        spec: the run's spec.
        resume: resume an existing run of this name.
        verbose: the job keeps third-party logging (``--verbose`` on its entrypoint).
        linger_wait_s: on a resume, how long to wait for the previous job's workers to exit.
    """
    preflight(spec)  # nothing is written or submitted for a spec the driver would refuse
    client = JobsClient.for_cluster(spec.cluster)
    running = active_job(client, spec.name)
    if running:
        raise CrucibleError(
            f"run {spec.name!r} is already running as job {running}; "
            f"follow it with `crucible jobs logs {running} --follow`"
        )
    if resume:
        wait_for_workers_to_exit(client, run_location(spec), linger_wait_s)
    run_dir = prepare_run(spec, resume=resume)
    stop_request(run_dir).rm()  # an earlier attempt's stop does not stop this one
    history = run_dir / "jobs.jsonl"
    attempt = len(read_jsonl(history))
    submission_id = f"crucible-{spec.name}-{attempt}-{int(time.time())}"
    entrypoint = f"{client.python()} -m crucible.jobs.entry {shlex.quote(run_dir.uri)}"
    if verbose:
        entrypoint += " --verbose"
    job_id = client.submit(
        entrypoint,
        submission_id=submission_id,
        metadata={"crucible_run": spec.name, "crucible_kind": spec.kind, "run_dir": run_dir.uri},
    )
    log = JsonlLog(history)
    log.append({"job": job_id, "submitted_at": time.time()}, sync=True)
    log.close()
    return client, job_id, run_dir


def follow(client: JobsClient, job_id: str) -> int:
    """Print the job's logs as they come; return 0 if it succeeded, 1 otherwise.

    Ctrl-C stops following; the job keeps running.
    """
    try:
        for chunk in client.follow(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`crucible jobs stop {job_id}`)")
        return 130
    status = client.status(job_id)
    name = getattr(status, "value", str(status))
    print(f"job {job_id}: {name}")
    return 0 if name == "SUCCEEDED" else 1
