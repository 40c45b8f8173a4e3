"""A real Prometheus with the local cluster's generated config and crucible's rules.

Lighter than the session's full cluster (no Ray head): the same ``prometheus_config``, with
crucible's target registry served from this process (what the cluster runs as a Ray actor),
scraping every second so tests see data quickly.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests

from crucible.cluster import local
from crucible.monitoring.discovery import TargetRegistry
from crucible.monitoring.prometheus import install_rules


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.ClusterState]:
    """A running Prometheus (``state.prometheus_url``) discovering crucible's targets from
    ``state.registry`` (a :class:`TargetRegistry`: tests register their exporters there)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed")
    state_dir = tmp_path_factory.mktemp("promstate")
    ports = local.Ports(prometheus=local.free_port(), metrics_discovery=local.free_port())
    state = local.ClusterState(str(state_dir), ports)
    state.registry = TargetRegistry("127.0.0.1", ports.metrics_discovery, probe_s=1.0)  # type: ignore[attr-defined]
    prom_dir = state_dir / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(local.prometheus_config(state, scrape_interval_s=1))
    install_rules(state_dir)
    log = (state_dir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={prom_dir / 'prometheus.yml'}",
         f"--storage.tsdb.path={prom_dir / 'data'}",
         f"--web.listen-address=127.0.0.1:{state.ports.prometheus}", "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{state.prometheus_url}/-/ready", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (state_dir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        yield state
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
