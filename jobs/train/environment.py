"""What a training rank's process needs before DeepSpeed is imported: the accelerator, a CUDA
architecture list DeepSpeed can parse, and third-party warnings turned down."""

from __future__ import annotations

import os
import re
import warnings


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` without CUDA's architecture-variant suffixes (``9.0a`` → ``9.0``).

    DeepSpeed (0.19.8) parses each entry's minor version with ``int()`` when it JIT-builds an
    op such as FusedAdam, so a list PyTorch accepts (``9.0a``, set by Hopper images) fails
    with ``invalid literal for int() with base 10: '0a'`` (deepspeedai/DeepSpeed#7589). The
    ops it builds need no variant-specific instructions.

    Args:
        value: the variable's value; entries separated by spaces or semicolons.
    """
    return re.sub(r"(\d+\.\d+)[af](?=\+|;|\s|$)", r"\1", value)


def prepare_process(use_gpu: bool) -> None:
    """Set up this rank's process; call it before anything imports DeepSpeed.

    Args:
        use_gpu: whether the rank trains on a GPU (else DeepSpeed's CPU accelerator).
    """
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    else:
        if "TORCH_CUDA_ARCH_LIST" in os.environ:  # before DeepSpeed builds FusedAdam
            arch = os.environ["TORCH_CUDA_ARCH_LIST"]
            os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch)
        # cuBLAS picks deterministic reductions only with a fixed workspace, which must be
        # set before its first call (torch.use_deterministic_algorithms asks for them).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # DeepSpeed's ZeRO-3 gathers call torch.distributed's *_tensor collectives, which torch
    # deprecates with a FutureWarning on every call: hundreds of job-log lines per run that
    # a user can do nothing about.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
        "deprecated",
        category=FutureWarning,
    )
