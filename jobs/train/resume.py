"""Restoring a rank from the checkpoint the group chose: the engine's shards and optimizer
state, this rank's random generators and the reader's position."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from crucible.cluster.storage import Location
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks import Resumed, TrainContext
from crucible.jobs.train.state import seed_everything, set_rng_state


def rank_seed(seed: int, rank: int, step: int | None = None) -> int:
    """The seed of a rank's random streams: at a fresh start, or (``step``) after a resume
    that changed the world size, where the saved per-rank streams no longer fit.

    Args:
        seed: ``train.seed``.
        rank: this rank.
        step: the step resumed from (None: a fresh start).
    """
    if step is None:
        return seed * 100_003 + rank
    return (seed * 100_003 + step) * 1_009 + rank


def restore(
    ctx: TrainContext, chosen: tuple[Location, Path, dict[str, Any]], state: dict[str, Any]
) -> Resumed:
    """Load checkpoint ``chosen`` into this rank; return what was loaded.

    Args:
        ctx: the rank's training context (engine built, reader open).
        chosen: from :func:`~crucible.jobs.train.checkpoint.choose_checkpoint`.
        state: the checkpoint's crucible state.
    """
    path, local, manifest = chosen
    t0 = time.perf_counter()
    ctx.engine.load_checkpoint(
        str(local), tag=ckpt.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
        load_module_strict=not ckpt.base_frozen(state),  # a LoRA run's base is loaded already
    )  # fmt: skip
    step = int(state["step"])
    if state["world_size"] != ctx.world:
        seed_everything(rank_seed(ctx.spec.train.seed, ctx.rank, step))
    else:
        saved = torch.load(local / "crucible_state" / f"rank-{ctx.rank}.pt", weights_only=False)
        set_rng_state(saved)
    ctx.reader.load_state_dict(state["reader"])
    seconds = time.perf_counter() - t0
    return Resumed(step, path, int(state["world_size"]), seconds, int(manifest["total_bytes"]))
