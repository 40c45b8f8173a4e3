"""The hardware catalogue and the cluster spec's hardware fields."""

from __future__ import annotations

import json

import pytest

from crucible.cluster.hardware import (
    GPU_NAMES,
    cpu_accelerator,
    get_accelerator,
    with_overrides,
)
from crucible.cluster.spec import ClusterSpec
from crucible.config import validate
from crucible.errors import CrucibleError


# Datasheet figures as collected in /work/shared/ANCHORS.md (NVIDIA A100, H100, H200).
@pytest.mark.parametrize(
    ("name", "tflops", "mem_gb", "hbm_tbs", "nvlink_gbs", "nic_gbps", "watts"),
    [
        ("a100-40gb", 312, 40, 1.555, 600, 200, 400),
        ("a100-80gb", 312, 80, 2.039, 600, 200, 400),
        ("h100-sxm", 989, 80, 3.35, 900, 400, 700),
        ("h200", 989, 141, 4.8, 900, 400, 700),
    ],
)
def test_catalogue_matches_datasheets(name, tflops, mem_gb, hbm_tbs, nvlink_gbs, nic_gbps, watts):
    acc = get_accelerator(name)
    assert acc.peak_flops == tflops * 1e12
    assert acc.memory_bytes == mem_gb * 10**9
    assert acc.hbm_bytes_per_s == pytest.approx(hbm_tbs * 1e12)
    assert acc.nvlink_bytes_per_s == nvlink_gbs * 1e9
    assert acc.inter_node_bytes_per_s == nic_gbps * 1e9 / 8
    assert acc.intra_node_bytes_per_s == nvlink_gbs * 1e9 / 2
    assert acc.watts == watts
    assert acc.gpus_per_node == 8
    assert acc.usd_per_hour > 0 and not acc.measured


def test_unknown_gpu_is_a_clear_error():
    with pytest.raises(CrucibleError, match=r"cluster.gpu = 'a100-80' .*did you mean a100-80gb"):
        get_accelerator("a100-80")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"gpu": "v100"}, r"spec: gpu = \"v100\" is invalid: unknown accelerator; use one of"),
        ({"nodes": 0}, r"spec: nodes = 0 is invalid"),
        ({"gpus_per_node": 0}, r"spec: gpus_per_node = 0 is invalid"),
        ({"pue": 0.5}, r"spec: pue = 0.5 is invalid"),
        ({"gpu_type": "h200"}, r"unknown key gpu_type"),
    ],
)
def test_cluster_spec_rejects_bad_hardware(data, match):
    with pytest.raises(CrucibleError, match=match):
        validate(ClusterSpec, data)


def test_cluster_spec_counts_gpus_and_keeps_old_fields():
    spec = validate(ClusterSpec, {"gpu": "h100-sxm", "nodes": 16, "storage": "s3://b/runs"})
    assert spec.num_gpus == 128 and spec.address == "local" and spec.storage == "s3://b/runs"
    assert validate(ClusterSpec, {}).num_gpus == 1  # local default: one CPU "device"
    assert set(GPU_NAMES) >= {"a100-40gb", "a100-80gb", "h100-sxm", "h200", "cpu"}


def test_overrides_replace_catalogue_values():
    acc = with_overrides(get_accelerator("a100-80gb"), usd_per_hour=0.5, nic_gbps=100, watts=300)
    assert acc.usd_per_hour == 0.5 and acc.inter_node_bytes_per_s == 100e9 / 8
    assert acc.watts == 300 and acc.peak_flops == 312e12


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    first = cpu_accelerator()
    assert first.measured and first.name == "cpu"
    assert 1e8 < first.peak_flops < 1e14  # any real CPU: 0.1 GFLOP/s to 100 TFLOP/s
    cache = tmp_path / "cpu_peak.json"
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [first.peak_flops]
    # A cached figure is reused as is (the cache, not a new benchmark, answers).
    key = next(iter(stored))
    cache.write_text(json.dumps({key: 123e9}))
    assert get_accelerator("cpu").peak_flops == 123e9
