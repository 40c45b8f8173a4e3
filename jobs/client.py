"""Submitting to a Ray cluster through the Jobs API, token-authenticated.

A thin layer over Ray's ``JobSubmissionClient``: it resolves ``cluster.address`` ('local' →
the embedded cluster's dashboard and token; an http(s) URL → a remote cluster with the token
from ``cluster.token_path``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), turns
connection failures into one-line errors, and follows logs.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from crucible.cluster import local
from crucible.cluster.spec import ClusterSpec
from crucible.errors import CrucibleError

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


@dataclass(frozen=True)
class Target:
    """A resolved cluster to submit to."""

    dashboard_url: str
    token_path: Path | None
    is_local: bool


def resolve(cluster: ClusterSpec | None = None) -> Target:
    """Resolve a cluster spec to the dashboard URL and token file to use."""
    cluster = cluster or ClusterSpec()
    if cluster.address == "local":
        state_dir = cluster.state_dir or local.default_state_dir()
        state = local.load_state(state_dir.expanduser().resolve())
        if state is None or not any(p.name == "ray" for p in state.alive()):
            raise CrucibleError(
                f"no local cluster is running (state dir {state_dir}); "
                "start one with `crucible cluster up`"
            )
        return Target(state.dashboard_url, state.token_path, True)
    address = cluster.address
    if not address.startswith(("http://", "https://")):
        raise CrucibleError(
            f"cluster.address {address!r} is not 'local' or a dashboard URL "
            "like http://head-node:8265"
        )
    token = cluster.token_path or (
        Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        if os.environ.get("RAY_AUTH_TOKEN_PATH")
        else Path.home() / ".ray" / "auth_token"
    )
    return Target(address.rstrip("/"), token if token.exists() else None, False)


class JobsClient:
    """Submit, watch and stop jobs on one cluster."""

    def __init__(self, target: Target):
        self.target = target
        self._headers = local.auth_headers(target.token_path) if target.token_path else {}
        with self._errors():
            self._client = JobSubmissionClient(target.dashboard_url, headers=self._headers)

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """Turn the Jobs API's failures into one-line errors: unreachable, refused token,
        unknown job."""
        url = self.target.dashboard_url
        try:
            yield
        except (ConnectionError, requests.RequestException) as e:
            raise CrucibleError(
                f"the Ray cluster at {url} does not answer ({type(e).__name__}); check the "
                "address or start it with `crucible cluster up`"
            ) from None
        except (AuthenticationError, RuntimeError) as e:
            text = str(e)
            if isinstance(e, AuthenticationError) or any(
                k in text for k in ("401", "403", "uthenticat", "nauthorized")
            ):
                which = str(self.target.token_path) if self.target.token_path else "none found"
                raise CrucibleError(
                    f"the Ray cluster at {url} refused the auth token ({which}); pass that "
                    "cluster's token file with --token-path or cluster.token_path"
                ) from None
            if job_id is not None and ("does not exist" in text or "404" in text):
                raise CrucibleError(
                    f"no job {job_id!r} on {url}; see `crucible jobs list`"
                ) from None
            raise

    @classmethod
    def for_cluster(cls, cluster: ClusterSpec | None = None) -> JobsClient:
        return cls(resolve(cluster))

    def python(self) -> str:
        """The interpreter a job's entrypoint should use on this cluster."""
        return sys.executable if self.target.is_local else "python"

    def submit(
        self,
        entrypoint: str,
        submission_id: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
    ) -> str:
        """Submit ``entrypoint``; return the submission id."""
        try:
            with self._errors():
                return self._client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env=runtime_env,
                    metadata=metadata,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                )
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            if "already exists" in msg:
                raise CrucibleError(
                    f"a job with id {submission_id!r} already exists on this cluster; "
                    "use another run name or `crucible resume`"
                ) from None
            raise CrucibleError(f"job submission failed: {msg}") from None

    def status(self, job_id: str) -> JobStatus:
        return self._call(self._client.get_job_status, job_id)

    def info(self, job_id: str) -> Any:
        return self._call(self._client.get_job_info, job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self._client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        return self._call(self._client.stop_job, job_id)

    def list(self) -> list[Any]:
        with self._errors():
            return self._client.list_jobs()

    def live_actors(self, job_id: str) -> builtins.list[str]:
        """Class names of job ``job_id``'s non-detached actors that are not dead: a job
        stopped through the Jobs API is STOPPED as soon as its driver is, while its workers
        take a while to exit (on every node; Ray's state API sees them all).

        Args:
            job_id: the submission id.
        """
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        ray_job = getattr(self.info(job_id), "job_id", None)
        if not ray_job:  # its driver never started: it has no actors
            return []
        with self._errors(job_id):
            client = StateApiClient(
                address=self.target.dashboard_url,
                headers={"Content-Type": "application/json", **self._headers},
            )
            actors = client.list(
                StateResource.ACTORS,
                options=ListApiOptions(
                    filters=[("job_id", "=", ray_job), ("state", "!=", "DEAD")], detail=True
                ),
                raise_on_missing_output=False,
            )
        # detached actors outlive their job by design (the cluster's metrics registry)
        return sorted(
            str(getattr(a, "class_name", "?"))
            for a in actors
            if not getattr(a, "is_detached", False)
        )

    def _call(self, fn: Any, job_id: str) -> Any:
        with self._errors(job_id):
            return fn(job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> JobStatus:
        """Block until the job reaches a terminal state (or ``timeout``); return its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st in TERMINAL:
                return st
            if deadline is not None and time.monotonic() > deadline:
                return st
            time.sleep(poll_s)

    def follow(self, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """Yield new log text as the job runs, until it ends."""
        seen = 0
        while True:
            st = self.status(job_id)
            text = self.logs(job_id)
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if st in TERMINAL:
                return
            time.sleep(poll_s)
