"""TrainMetrics / DataMetrics values, exception safety, NVML absence, device peaks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from crucible.model.accounting import hardware_flops_per_token, model_flops_per_token
from crucible.model.presets import get_preset
from crucible.monitoring import peak
from crucible.monitoring.metrics import DataMetrics, TrainMetrics, train_metrics_for


def value(m: TrainMetrics | DataMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_on_step_records_throughput_and_palm_mfu() -> None:
    m = TrainMetrics(1e9, 1.25e9, num_devices=4, peak_flops_per_device=312e12, total_steps=100)
    m.on_step(7, 2.5, 3e-4, 0.9, tokens=1_048_576, samples=512, step_seconds=2.0,
              data_wait_seconds=0.1)  # fmt: skip
    assert value(m, "crucible_train_tokens_total") == 1_048_576
    assert value(m, "crucible_train_samples_total") == 512
    assert value(m, "crucible_train_step") == 7
    assert value(m, "crucible_train_loss") == 2.5
    assert value(m, "crucible_train_data_wait_seconds_total") == pytest.approx(0.1)
    per_device_tok_s = 1_048_576 / 2.0 / 4
    assert value(m, "crucible_train_model_flops_per_second") == pytest.approx(
        1e9 * per_device_tok_s
    )
    assert value(m, "crucible_train_hardware_flops_per_second") == pytest.approx(
        1.25e9 * per_device_tok_s
    )
    assert value(m, "crucible_train_mfu_ratio") == pytest.approx(1e9 * per_device_tok_s / 312e12)
    assert value(m, "crucible_train_step_seconds_count") == 1
    assert value(m, "crucible_train_step_seconds_bucket", le="+Inf") == 1
    assert value(m, "crucible_train_target_steps") == 100
    assert value(m, "crucible_train_last_step_timestamp_seconds") > 0


def test_mfu_from_a_model_config_matches_accounting() -> None:
    cfg = get_preset("tiny")
    m = train_metrics_for(cfg, 128, num_devices=2, peak_flops_per_device=1e12, recompute=True)
    m.on_step(1, 5.0, 1e-3, 1.0, tokens=4096, samples=32, step_seconds=0.5)
    expected = model_flops_per_token(cfg, 128) * 4096 / 0.5 / 2 / 1e12
    assert value(m, "crucible_train_mfu_ratio") == pytest.approx(expected)
    assert value(m, "crucible_train_hardware_flops_per_second") == pytest.approx(
        hardware_flops_per_token(cfg, 128, True) * 4096 / 0.5 / 2
    )


def test_non_zero_ranks_record_only_per_device_metrics() -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=2, peak_flops_per_device=1e12, rank=1)
    m.on_step(1, 2.0, 1e-3, 1.0, tokens=1000, samples=4, step_seconds=1.0, data_wait_seconds=0.2)
    assert value(m, "crucible_train_tokens_total") is None  # only rank 0 exports it
    assert value(m, "crucible_train_step_seconds_count") == 1
    assert value(m, "crucible_train_data_wait_seconds_total") == pytest.approx(0.2)


def test_nan_loss_checkpoints_restarts_and_eval() -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    m.on_step(1, float("nan"), 1e-3, None, tokens=10, samples=1, step_seconds=0.1)
    assert math.isnan(value(m, "crucible_train_loss"))
    assert math.isnan(value(m, "crucible_train_grad_norm"))
    m.on_eval(3.25)
    m.on_checkpoint(100, 4.0, 2_000_000)
    m.on_checkpoint(200, 6.0, 2_000_000)
    m.on_load(1.5, 2_000_000)
    m.on_restart(2)
    m.on_restart()
    m.on_restart(1)  # an older total never lowers the counter
    assert value(m, "crucible_train_heldout_loss") == 3.25
    assert value(m, "crucible_checkpoint_save_seconds_total") == 10.0
    assert value(m, "crucible_checkpoint_saved_bytes_total") == 4_000_000
    assert value(m, "crucible_checkpoint_saves_total") == 2
    assert value(m, "crucible_checkpoint_last_step") == 200
    assert value(m, "crucible_checkpoint_loaded_bytes_total") == 2_000_000
    assert value(m, "crucible_train_restarts_total") == 3


def test_checkpoint_save_seconds_count_the_blocked_time_and_the_write_is_apart() -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    m.on_checkpoint(100, 4.0, 2_000_000)  # synchronous: blocked for all of its write
    m.on_checkpoint(200, 0.5, 2_000_000, write_seconds=7.0)  # asynchronous
    assert value(m, "crucible_checkpoint_save_seconds_total") == 4.5
    assert value(m, "crucible_checkpoint_write_seconds_total") == 11.0


def test_bad_calls_never_raise_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    with caplog.at_level(logging.ERROR, logger="crucible.monitoring.metrics"):
        for _ in range(3):
            assert m.on_step(1, 1.0, 1e-3, 1.0, tokens="many", samples=1, step_seconds=1.0) is None  # type: ignore[arg-type]
    assert len([r for r in caplog.records if "on_step failed" in r.getMessage()]) == 1


def test_no_gpu_series_on_a_cpu_machine() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    m = TrainMetrics(1e9, 1e9, num_devices=1, peak_flops_per_device=1e12)
    text = generate_latest(m.registry).decode()
    assert "crucible_gpu_" not in text
    assert "crucible_device_memory" not in text
    assert "crucible_process_resident_memory_bytes" in text


def test_data_metrics_export_cumulative_stats() -> None:
    d = DataMetrics()
    d.update({
        "read": {"docs_in": 100, "docs_out": 100, "bytes_in": 5000, "bytes_out": 5000},
        "quality": {"docs_in": 100, "docs_out": 70, "bytes_in": 5000, "bytes_out": 3000,
                    "dropped": {"too_short": 20, "symbol_ratio": 10}, "counters": {"x": 1}},
    })  # fmt: skip
    d.on_dedup(12, {"2": 4, "3": 1})
    assert value(d, "crucible_data_documents_in_total", stage="quality") == 100
    assert value(d, "crucible_data_documents_out_total", stage="quality") == 70
    assert value(d, "crucible_data_bytes_out_total", stage="quality") == 3000
    assert (
        value(d, "crucible_data_dropped_documents_total", stage="quality", rule="too_short") == 20
    )
    assert value(d, "crucible_data_duplicate_clusters") == 5
    assert value(d, "crucible_data_duplicate_documents") == 12
    d.update("not a mapping")  # type: ignore[arg-type]  # swallowed, state kept
    assert value(d, "crucible_data_documents_in_total", stage="read") == 100


def test_gpu_catalogue() -> None:
    # Peaks from NVIDIA datasheets (ANCHORS.md: A100 312, H100 SXM 989, H200 989 TFLOP/s bf16).
    assert peak.gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak.gpu_peak_flops("NVIDIA H200") == 989e12
    assert peak.gpu_peak_flops("NVIDIA H100 PCIe") is None  # 756 TF part: measured instead
    assert peak.gpu_peak_flops("Tesla T4") is None


def test_cpu_peak_is_measured_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    measured = peak.cpu_peak_flops(1)
    assert 1e8 < measured < 1e13  # one core does between 0.1 and 10,000 GFLOP/s
    (cache,) = tmp_path.glob("*.json")
    table = json.loads(cache.read_text())
    key = next(k for k in table if "threads=1" in k)
    table[key] = 123.0
    cache.write_text(json.dumps(table))
    assert peak.cpu_peak_flops(1) == 123.0
    name, value = peak.device_peak_flops(threads=1)
    assert name.startswith("cpu") and value == 123.0
