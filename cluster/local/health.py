"""Health of the local cluster: its processes, Ray's jobs and nodes, Prometheus' targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from crucible.cluster.local.state import ClusterState, default_state_dir, load_state
from crucible.cluster.local.token import auth_headers


def status(state_dir: Path | None = None) -> dict[str, Any]:
    """Health of the local cluster: processes, Ray, Prometheus targets, jobs."""
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    state = load_state(state_dir)
    info: dict[str, Any] = {"state_dir": str(state_dir), "running": False}
    if state is None:
        return info
    alive = {p.name for p in state.alive()}
    info.update(
        running=bool(alive),
        processes={p.name: (p.pid if p.name in alive else None) for p in state.procs},
        dashboard=state.dashboard_url,
        prometheus=state.prometheus_url,
        ray_address=_ray_address(state),
        ray_temp_dir=str(state.ray_temp_dir),
        started_at=state.started_at,
    )
    if "ray" in alive:
        info["ray"] = _ray_health(state)
    if "prometheus" in alive:
        info["targets"] = prometheus_targets(state.prometheus_url)
    return info


def _ray_address(state: ClusterState) -> str:
    """The GCS address Ray registered (its node address, not necessarily loopback)."""
    current = state.ray_temp_dir / "ray_current_cluster"
    try:
        return current.read_text().strip()
    except OSError:
        return f"{state.node_ip}:{state.ports.gcs}"


def _ray_health(state: ClusterState) -> dict[str, Any]:
    headers = auth_headers(state.token_path)
    out: dict[str, Any] = {}
    try:
        r = requests.get(f"{state.dashboard_url}/api/jobs/", headers=headers, timeout=5)
        r.raise_for_status()
        jobs = r.json()
        out["healthy"] = True
        out["jobs"] = [
            {
                "id": j.get("submission_id") or j.get("job_id"),
                "status": j.get("status"),
                "entrypoint": j.get("entrypoint", "")[:80],
            }
            for j in jobs
            if j.get("status") in ("PENDING", "RUNNING")
        ]
    except (requests.RequestException, ValueError) as e:
        out["healthy"] = False
        out["error"] = type(e).__name__
    try:
        r = requests.get(f"{state.dashboard_url}/api/v0/nodes", headers=headers, timeout=5)
        nodes = r.json()["data"]["result"]["result"]
        out["nodes"] = sum(1 for n in nodes if n.get("state") == "ALIVE")
    except (requests.RequestException, ValueError, KeyError):
        pass
    return out


def prometheus_targets(prometheus_url: str) -> list[dict[str, str]]:
    """Active scrape targets of a Prometheus: job, address, health."""
    try:
        r = requests.get(f"{prometheus_url}/api/v1/targets", timeout=5)
        r.raise_for_status()
        active = r.json()["data"]["activeTargets"]
    except (requests.RequestException, ValueError, KeyError):
        return []
    return [
        {
            "job": t["labels"].get("job", ""),
            "instance": t["labels"].get("instance", ""),
            "health": t.get("health", "unknown"),
        }
        for t in active
    ]
