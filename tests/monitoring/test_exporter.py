"""The exporter serves its registry; the cluster's target registry serves Prometheus' HTTP
service discovery and drops targets whose process is gone."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from prometheus_client import CollectorRegistry

from crucible.monitoring.discovery import TargetRegistry, scrape_config
from crucible.monitoring.exporter import start_exporter, stop_exporter
from crucible.monitoring.metrics import TrainMetrics


def test_serves_metrics_on_the_given_address() -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    m.on_step(1, 2.0, 1e-3, 1.0, tokens=256, samples=2, step_seconds=0.5)
    port = start_exporter("r1", "train", 0, m.registry, host="127.0.0.1", announce=False)
    assert port is not None
    try:
        body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "crucible_train_tokens_total 256.0" in body
    finally:
        stop_exporter(port)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_port_in_use_returns_none_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="crucible.monitoring.exporter"):
            for _ in range(2):
                assert start_exporter("r", "t", 0, m.registry, port=busy, host="127.0.0.1") is None
    assert len([r for r in caplog.records if "cannot bind" in r.getMessage()]) == 1


def test_without_a_registry_the_exporter_still_serves() -> None:
    """Outside a Ray job there is no registry to announce to: served, unannounced,
    said once, no traceback. A fresh interpreter: this process may hold an earlier test's Ray."""
    code = (
        "import logging, requests\n"
        "from prometheus_client import CollectorRegistry\n"
        "from crucible.monitoring.exporter import start_exporter, stop_exporter\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "port = start_exporter('r', 'data', 0, CollectorRegistry(), host='127.0.0.1')\n"
        "assert port is not None\n"
        "assert requests.get(f'http://127.0.0.1:{port}/metrics', timeout=5).ok\n"
        "stop_exporter(port)\n"
        "print('served', flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "served"
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("not in a Ray job: metrics are served at") == 1, out.stderr


def test_registry_serves_http_sd_and_drops_a_dead_target() -> None:
    reg = TargetRegistry("127.0.0.1", 0, probe_s=0.2, misses=2)
    assert not reg.watched(600)  # nothing has read its targets yet
    live = start_exporter("r", "train", 0, CollectorRegistry(), host="127.0.0.1", announce=False)
    code = (
        "import sys, time\n"
        "from prometheus_client import CollectorRegistry\n"
        "from crucible.monitoring.exporter import start_exporter\n"
        "print(start_exporter('r', 'train', 1, CollectorRegistry(), host='127.0.0.1',\n"
        "                     announce=False), flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        dead_port = int(child.stdout.readline())  # type: ignore[union-attr]
        reg.register(f"127.0.0.1:{live}", {"run": "r", "job": "train", "rank": "0"})
        reg.register(f"127.0.0.1:{dead_port}", {"run": "r", "job": "train", "rank": "1"})
        groups = requests.get(reg.where(), timeout=5).json()
        assert groups == [
            {"targets": [a], "labels": {"run": "r", "job": "train", "rank": r}}
            for a, r in sorted([(f"127.0.0.1:{live}", "0"), (f"127.0.0.1:{dead_port}", "1")])
        ]
        child.kill()  # the process of rank 1 dies without deregistering
        child.wait()
        deadline = time.monotonic() + 60
        while len(reg.groups()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [g["targets"] for g in reg.groups()] == [[f"127.0.0.1:{live}"]]
        reg.deregister(f"127.0.0.1:{live}")
        assert requests.get(reg.where(), timeout=5).json() == []
        assert reg.watched(600)  # read above: a Prometheus (here, the test) is watching
        assert requests.get(reg.where().replace("/targets", "/x"), timeout=5).status_code == 404
    finally:
        child.kill()
        stop_exporter(live)  # type: ignore[arg-type]


def test_generated_scrape_config_passes_promtool(tmp_path) -> None:
    import shutil

    import yaml

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    sd = tmp_path / "ray_sd.json"
    sd.write_text("[]")
    cfg = scrape_config("http://10.0.0.1:8269/targets", ray_sd_file=str(sd), scrape_interval_s=15)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_final_scrape_is_awaited_not_slept() -> None:
    """At the end an exporter waits for a scrape that begins after it asks (the last values
    are then in Prometheus) and returns as soon as there is one; earlier scrapes don't count."""
    from prometheus_client import start_http_server

    from crucible.monitoring.exporter import _Scrapes

    scrapes = _Scrapes(CollectorRegistry())
    server, _ = start_http_server(0, addr="127.0.0.1", registry=scrapes)  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        assert requests.get(url, timeout=5).ok
        assert not scrapes.wait_next(0.2)  # the scrape before the wait is not the final one
        stop = threading.Event()

        def prometheus() -> None:
            while not stop.is_set():
                requests.get(url, timeout=5)
                time.sleep(0.05)

        t = threading.Thread(target=prometheus, daemon=True)
        before = scrapes.count
        t.start()
        try:
            assert scrapes.wait_next(60)
        finally:
            stop.set()
            t.join()
        assert scrapes.count > before
    finally:
        server.shutdown()
        server.server_close()
