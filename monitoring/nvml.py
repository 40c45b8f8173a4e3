"""NVIDIA GPU utilisation, memory and power from NVML, for the GPU this process trains on.

Present only where NVML initialises and the process has a CUDA device; on a CPU machine
:func:`nvml_collector` returns None and no ``crucible_gpu_*`` series exist at all (rather than
zeros that would read as an idle GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class NvmlCollector(Collector):
    """Reads one device's utilisation, memory and power at every scrape."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the ``crucible_gpu_*`` gauges; an NVML error skips that scrape's values."""
        n = self._nvml
        try:
            util = n.nvmlDeviceGetUtilizationRates(self._handle)
            mem = n.nvmlDeviceGetMemoryInfo(self._handle)
            power_mw = n.nvmlDeviceGetPowerUsage(self._handle)
        except n.NVMLError as e:
            log.debug("NVML read failed: %s", e)
            return
        yield GaugeMetricFamily(
            "crucible_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran on the GPU (NVML).",
            value=util.gpu / 100.0,
        )
        yield GaugeMetricFamily(
            "crucible_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).", mem.used
        )
        yield GaugeMetricFamily(
            "crucible_gpu_memory_total_bytes", "GPU memory capacity (NVML).", mem.total
        )
        yield GaugeMetricFamily(
            "crucible_gpu_power_watts", "GPU board power draw (NVML).", power_mw / 1000.0
        )


def nvml_collector() -> NvmlCollector | None:
    """A collector for this process's current CUDA device, or None without a GPU or NVML."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        # NVML enumerates all GPUs regardless of CUDA_VISIBLE_DEVICES: match on the UUID.
        handle = pynvml.nvmlDeviceGetHandleByUUID(
            uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        )
        return NvmlCollector(pynvml, handle)
    except Exception as e:  # no driver, no permission, old NVML: GPU series stay absent
        log.info("NVML metrics unavailable: %s", e)
        return None
