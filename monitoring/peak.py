"""Peak FLOP/s of the device a worker trains on: the denominator of MFU.

GPUs come from a small catalogue of published dense bf16 peaks (NVIDIA datasheets; see
/work/shared/ANCHORS.md), matched on the name torch reports. A CPU has no meaningful
datasheet figure for our kernels, so its peak is *measured*: a short square-matmul benchmark
at the worker's thread count, cached per (CPU model, threads, dtype) so each worker pays for
it once per machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s. Order matters: first substring wins,
# so the more specific names come first.
GPU_PEAK_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),  # 40GB and 80GB alike
]


def gpu_peak_flops(device_name: str) -> float | None:
    """The catalogue's dense bf16 peak for a CUDA device name, or None if unknown.

    Args:
        device_name: as ``torch.cuda.get_device_name()`` reports it, e.g.
            ``"NVIDIA H100 80GB HBM3"``.
    """
    for key, peak in GPU_PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def _cache_path() -> Path:
    home = os.environ.get("CRUCIBLE_HOME")
    return (Path(home) if home else Path.home() / ".crucible") / "cpu_peak_flops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_flops(threads: int, dtype: str = "float32", seconds: float = 0.5) -> float:
    """Best sustained matmul FLOP/s of this CPU at ``threads`` intra-op threads.

    Args:
        threads: torch intra-op threads to measure with (a worker's reserved CPUs).
        dtype: torch dtype name of the matmul.
        seconds: measuring time budget.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        n = 512
        dt = getattr(torch, dtype)
        a = torch.randn(n, n, dtype=torch.float32).to(dt)
        b = torch.randn(n, n, dtype=torch.float32).to(dt)
        torch.mm(a, b)  # warm-up: first call allocates and picks kernels
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            dt_s = time.perf_counter() - t0
            best = max(best, 4 * 2 * n**3 / dt_s)
        return best
    finally:
        torch.set_num_threads(old)


def cpu_peak_flops(threads: int, dtype: str = "float32", cache: Path | None = None) -> float:
    """Measured CPU peak (see :func:`measure_cpu_flops`), cached in a JSON file.

    Args:
        threads: intra-op threads of one worker.
        dtype: torch dtype name.
        cache: cache file (default ``$CRUCIBLE_HOME/cpu_peak_flops.json``).
    """
    path = cache or _cache_path()
    key = f"{_cpu_model()}|{threads}|{dtype}"
    try:
        table = json.loads(path.read_text())
        if isinstance(table, dict) and isinstance(table.get(key), int | float):
            return float(table[key])
    except (OSError, ValueError):
        table = {}
    peak = measure_cpu_flops(threads, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = table if isinstance(table, dict) else {}
        table[key] = peak
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError as e:  # an unwritable cache only costs a re-measure next time
        log.warning("cannot cache the CPU peak in %s: %s", path, e.strerror)
    return peak


def device_peak_flops(threads: int | None = None) -> tuple[str, float]:
    """This process's training device and its peak FLOP/s.

    The current CUDA device if there is one (catalogue; unknown GPUs fall back to a measured
    bf16 matmul so MFU stays defined), else the CPU measured at ``threads``.

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
    return f"cpu ({_cpu_model()}, {threads} threads)", cpu_peak_flops(threads)


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
