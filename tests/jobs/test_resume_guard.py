"""A resume waits for the previous job's workers to exit: a job stopped through the Jobs API
is STOPPED at once while its actors take a while to die, and workers left alive would train
beside the resumed run and write into its checkpoints."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

from crucible.cluster import local
from crucible.cluster.storage import JsonlLog, location
from crucible.errors import CrucibleError
from crucible.jobs.client import JobsClient
from crucible.jobs.submit import wait_for_workers_to_exit

# A stand-in for a training job: a driver whose actor lives until the test lets it end.
STAND_IN = """
import os, sys, time, ray
ray.init()

@ray.remote(num_cpus=0)
class TrainWorkerStandIn:
    def ping(self):
        return os.getpid()

worker = TrainWorkerStandIn.remote()
ray.get(worker.ping.remote())
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
"""


def test_resume_waits_for_the_previous_jobs_workers(
    local_cluster: local.ClusterState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
    client = JobsClient.for_cluster()
    ready, release = tmp_path / "ready", tmp_path / "release"
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    job = client.submit(
        f"{shlex.quote(sys.executable)} {script} {ready} {release}",
        metadata={"crucible_run": "guarded"},
    )
    run = location(tmp_path / "guarded")
    log = JsonlLog(run / "jobs.jsonl")
    log.append({"job": job, "submitted_at": time.time()}, sync=True)
    log.close()
    deadline = time.monotonic() + 300  # a bound on a broken cluster, not on the code's speed
    while not ready.exists():
        assert client.status(job) not in {"FAILED", "STOPPED"}, client.logs(job)[-3000:]
        assert time.monotonic() < deadline, client.logs(job)[-3000:]
        time.sleep(0.2)

    assert client.live_actors(job) == ["TrainWorkerStandIn"]
    with pytest.raises(CrucibleError, match=r"1 actor of run 'guarded'.* is still alive "
                       r"\(TrainWorkerStandIn\)"):  # fmt: skip
        wait_for_workers_to_exit(client, run, wait_s=0)

    release.touch()
    assert str(client.wait(job, timeout=300)).endswith("SUCCEEDED")
    wait_for_workers_to_exit(client, run, wait_s=300)  # returns once the actor is dead
    assert client.live_actors(job) == []


def test_a_run_without_jobs_on_this_cluster_resumes_at_once(
    local_cluster: local.ClusterState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
    client = JobsClient.for_cluster()
    run = location(tmp_path / "elsewhere")
    wait_for_workers_to_exit(client, run, wait_s=0)  # no history
    log = JsonlLog(run / "jobs.jsonl")
    log.append({"job": "crucible-elsewhere-0-1", "submitted_at": time.time()}, sync=True)
    log.close()
    wait_for_workers_to_exit(client, run, wait_s=0)  # a job another cluster ran
