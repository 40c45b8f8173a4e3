"""The cluster's Prometheus scrape config, the same on every cluster: crucible's exporters by
HTTP service discovery from the target registry (:mod:`crucible.monitoring.discovery` serves
it on the head at ``http://<head>:<port>/targets``), Ray's metrics agents by Ray's own
discovery file. The local cluster and the generated launcher/KubeRay configs use it; the
registry's port and path are defined here, where both sides meet."""

from __future__ import annotations

from typing import Any

PORT_ENV = "CRUCIBLE_METRICS_SD_PORT"
DEFAULT_PORT = 8269  # beside Ray's dashboard (8265)
PATH = "/targets"


def scrape_config(
    sd_url: str,
    ray_sd_file: str | None = None,
    scrape_interval_s: float = 5.0,
    rule_files: list[str] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Prometheus config that finds crucible's exporters (and Ray's metrics agents) the one
    way every cluster does: HTTP SD from the registry, Ray's own discovery file.

    Args:
        sd_url: the registry's URL (``http://<head>:<port>/targets``).
        ray_sd_file: Ray's ``prom_metrics_service_discovery.json`` on the head, if any.
        scrape_interval_s: scrape and rule evaluation interval.
        rule_files: rule files to load.
        extra: more scrape configs (Prometheus itself).
    """
    interval = f"{scrape_interval_s:g}s"
    jobs: list[dict[str, Any]] = [
        {"job_name": "crucible", "http_sd_configs": [{"url": sd_url, "refresh_interval": interval}]}
    ]
    if ray_sd_file:
        jobs.append({"job_name": "ray", "file_sd_configs": [{"files": [ray_sd_file]}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": jobs + (extra or []),
    }
    if rule_files:
        config["rule_files"] = rule_files
    return config
