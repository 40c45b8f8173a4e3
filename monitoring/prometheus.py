"""Crucible's side of Prometheus: install the rule files, reload, and read back series and
alerts over the HTTP API (for ``crucible monitor`` and the tests)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import requests

from crucible.cluster.storage import write_atomic

log = logging.getLogger(__name__)

RULES_DIR = Path(__file__).parent / "rules"


def rule_files() -> list[Path]:
    """Crucible's rule files (``monitoring/rules/*.yml``)."""
    return sorted(RULES_DIR.glob("*.yml"))


def install_rules(state_dir: Path, prometheus_url: str | None = None) -> list[Path]:
    """Copy the rule files into ``<state>/prometheus/rules/`` and ask Prometheus to reload.

    The local cluster's Prometheus loads ``rules/*.yml`` from there and runs with
    ``--web.enable-lifecycle``; a Prometheus that is down is logged and skipped (it loads the
    rules when it starts).

    Args:
        state_dir: the local cluster's state directory.
        prometheus_url: e.g. ``http://127.0.0.1:9090``; None: copy only.

    Returns:
        The installed files.
    """
    dest = Path(state_dir) / "prometheus" / "rules"
    dest.mkdir(parents=True, exist_ok=True)
    installed = []
    for src in rule_files():
        write_atomic(dest / src.name, src.read_bytes())  # a reload never sees half a file
        installed.append(dest / src.name)
    if prometheus_url:
        reload(prometheus_url)
    return installed


def reload(prometheus_url: str) -> bool:
    """POST ``/-/reload``; return whether Prometheus accepted it (logged if not).

    Args:
        prometheus_url: the Prometheus base URL.
    """
    try:
        r = requests.post(f"{prometheus_url}/-/reload", timeout=10)
        r.raise_for_status()
        return True
    except requests.RequestException as e:
        log.warning("Prometheus at %s did not reload its rules: %s", prometheus_url, e)
        return False


def query(prometheus_url: str, expr: str, timeout: float = 5.0) -> list[dict[str, Any]] | None:
    """Instant query; the result vector, or None if Prometheus cannot be asked.

    Args:
        prometheus_url: the Prometheus base URL.
        expr: PromQL.
        timeout: seconds.
    """
    try:
        r = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=timeout)
        r.raise_for_status()
        data = r.json()["data"]
    except (requests.RequestException, ValueError, KeyError):
        return None
    result = data.get("result", [])
    if data.get("resultType") == "scalar":
        return [{"metric": {}, "value": result}]
    return result if isinstance(result, list) else None


def firing_alerts(prometheus_url: str, run: str | None = None) -> list[dict[str, Any]] | None:
    """Alerts from ``/api/v1/alerts`` (firing and pending), optionally of one run.

    Args:
        prometheus_url: the Prometheus base URL.
        run: keep only alerts labelled with this run.
    """
    try:
        r = requests.get(f"{prometheus_url}/api/v1/alerts", timeout=5)
        r.raise_for_status()
        alerts = r.json()["data"]["alerts"]
    except (requests.RequestException, ValueError, KeyError):
        return None
    return [a for a in alerts if run is None or a.get("labels", {}).get("run") == run]
