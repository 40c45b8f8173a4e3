"""Peak FLOP/s of the device a worker trains on: the denominator of MFU.

Figures come from the hardware catalogue (:mod:`crucible.cluster.hardware`): datasheet dense
bf16 peaks for GPUs, matched here on the name torch reports, and for a CPU a measured fp32
matmul figure, cached per CPU model and thread count. A GPU the catalogue does not know gets
a measured bf16 matmul instead, so MFU stays defined.
"""

from __future__ import annotations

import logging
import time

from crucible.cluster.hardware import cpu_accelerator, get_accelerator

log = logging.getLogger(__name__)

# torch device-name fragment → catalogue entry; first match wins, so specific names first.
# The H100 PCIe (756 TFLOP/s) is not the SXM part: it falls through to a measurement.
DEVICE_NAMES: list[tuple[str, str | None]] = [
    ("H200", "h200"),
    ("H100 PCIe", None),
    ("H100", "h100-sxm"),
    ("A100-SXM4-40GB", "a100-40gb"),
    ("A100-PCIE-40GB", "a100-40gb"),
    ("A100", "a100-80gb"),
]


def gpu_peak_flops(device_name: str) -> float | None:
    """The catalogue's dense bf16 peak for a CUDA device name, or None if unknown.

    Args:
        device_name: as ``torch.cuda.get_device_name()`` reports it, e.g.
            ``"NVIDIA H100 80GB HBM3"``.
    """
    for fragment, key in DEVICE_NAMES:
        if fragment.lower() in device_name.lower():
            return get_accelerator(key).peak_flops if key else None
    return None


def cpu_peak_flops(threads: int) -> float:
    """The catalogue's measured CPU peak at ``threads`` intra-op threads (cached).

    Args:
        threads: torch intra-op threads of one worker.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return cpu_accelerator().peak_flops
    finally:
        torch.set_num_threads(old)


def device_peak_flops(threads: int | None = None) -> tuple[str, float]:
    """This process's training device and its peak FLOP/s.

    Args:
        threads: CPU threads per worker (default: torch's current intra-op thread count).
    """
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name)
        if peak is None:
            log.warning("no catalogued peak for %r; MFU uses a measured bf16 matmul", name)
            peak = _measure_cuda_bf16()
        return name, peak
    threads = threads or torch.get_num_threads()
    return f"cpu ({threads} threads)", cpu_peak_flops(threads)


def _measure_cuda_bf16(n: int = 8192, iters: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return iters * 2 * n**3 / (time.perf_counter() - t0)
