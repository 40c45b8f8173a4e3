"""The learning-rate schedule as a pure function of the optimizer step.

Being a function of the step alone (no scheduler object with state), the LR after a resume,
a restart or a world-size change is the LR of an uninterrupted run by construction.
"""

from __future__ import annotations

import math

from crucible.jobs.train.spec import OptimSpec


def lr_at(step: int, optim: OptimSpec, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from lr/warmup_steps to lr over ``warmup_steps``; then ``cosine`` decays to
    ``min_lr_ratio·lr`` at the last step, ``constant`` holds lr, and ``wsd``
    (warmup-stable-decay, as in MiniCPM) holds lr until the final ``decay_fraction`` of the
    steps and decays linearly to ``min_lr_ratio·lr`` over them.

    Args:
        step: optimizer steps already taken (the LR used for step ``step + 1``).
        optim: the ``optim`` section of the spec.
        total_steps: planned optimizer steps of the whole run.
    """
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return peak
    span = max(total_steps - optim.warmup_steps, 1)
    if optim.schedule == "cosine":
        progress = min((step - optim.warmup_steps) / max(span - 1, 1), 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(round(optim.decay_fraction * span), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return peak + (floor - peak) * progress
