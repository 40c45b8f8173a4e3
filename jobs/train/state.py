"""Everything random on a rank (Python, NumPy, torch CPU and CUDA generators): seeding,
capturing and restoring, so a resumed rank draws exactly the numbers it would have drawn."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed``.

    Args:
        seed: the seed; callers derive it from (run seed, rank) so ranks differ.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every random generator of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`rng_state`.

    Args:
        state: from :func:`rng_state` on the same rank of an earlier attempt.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_deterministic(num_threads: int) -> None:
    """Fix the thread count and ask torch for deterministic kernels.

    A fixed intra-op thread count fixes the reduction order of CPU kernels, which bitwise
    exact resume relies on; ``warn_only`` keeps ops without a deterministic variant usable.

    Args:
        num_threads: intra-op threads (the CPUs reserved for this worker).
    """
    torch.set_num_threads(max(1, num_threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
