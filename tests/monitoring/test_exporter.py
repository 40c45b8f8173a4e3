"""The exporter serves its registry and keeps the cluster's file-SD list right."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from crucible.monitoring.exporter import (
    register_target,
    sd_path,
    start_exporter,
    stop_exporter,
)
from crucible.monitoring.metrics import TrainMetrics


def targets(state: Path) -> list[dict]:
    return json.loads((state / "prometheus" / "crucible_targets.json").read_text())


def test_serves_metrics_and_registers_with_labels(tmp_path: Path) -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    m.on_step(1, 2.0, 1e-3, 1.0, tokens=256, samples=2, step_seconds=0.5)
    port = start_exporter("r1", "train", 0, m.registry, state_dir=tmp_path)
    assert port is not None
    try:
        body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "crucible_train_tokens_total 256.0" in body
        (group,) = targets(tmp_path)
        assert group["targets"] == [f"127.0.0.1:{port}"]
        assert {k: v for k, v in group["labels"].items() if not k.startswith("__")} == {
            "run": "r1", "job": "train", "rank": "0"
        }  # fmt: skip
    finally:
        stop_exporter(port)
    assert targets(tmp_path) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_port_in_use_returns_none_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="crucible.monitoring.exporter"):
            assert (
                start_exporter("r", "train", 0, m.registry, port=busy, state_dir=tmp_path) is None
            )
            assert (
                start_exporter("r", "train", 0, m.registry, port=busy, state_dir=tmp_path) is None
            )
    assert len([r for r in caplog.records if "cannot bind" in r.getMessage()]) == 1
    assert not (tmp_path / "prometheus" / "crucible_targets.json").exists()


def test_unwritable_discovery_keeps_serving(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file where a directory should be")
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    port = start_exporter("r", "train", 0, m.registry, state_dir=state)
    assert port is not None
    try:
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).ok
    finally:
        stop_exporter(port)


def test_dead_process_entries_are_pruned_and_others_kept(tmp_path: Path) -> None:
    path = sd_path(tmp_path)
    assert path is not None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    register_target(path, "127.0.0.1:1", {"run": "old"}, pid=int(dead.stdout))
    register_target(path, "127.0.0.1:2", {"run": "live"})
    register_target(path, "127.0.0.1:3", {"run": "live2"})
    assert [g["targets"] for g in targets(tmp_path)] == [["127.0.0.1:2"], ["127.0.0.1:3"]]


def test_exporter_deregisters_at_exit(tmp_path: Path) -> None:
    code = (
        "from prometheus_client import CollectorRegistry\n"
        "from crucible.monitoring.exporter import start_exporter\n"
        f"print(start_exporter('r', 'data', 0, CollectorRegistry(), state_dir={str(tmp_path)!r}))\n"
        f"import json; print(len(json.load(open({str(sd_path(tmp_path))!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == "1"
    assert targets(tmp_path) == []
