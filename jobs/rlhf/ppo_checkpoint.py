"""A PPO run's checkpoints: the actor where a train run's model is (``ds/``, so generate,
eval and export read a PPO run as any other) and the critic in ``critic/``, every rank's
RNG state, and crucible's state (step, KL coefficient, reward statistics, spec), committed
as every crucible checkpoint is (see :mod:`crucible.jobs.train.checkpoint`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crucible.cluster.storage import Location
from crucible.jobs.train.console import say

if TYPE_CHECKING:
    from crucible.jobs.rlhf.ppo_worker import PPOWorker

CRITIC_TAG = "critic"


def state(self: PPOWorker) -> dict[str, Any]:
    """crucible's state of a PPO checkpoint (rank 0's is written)."""
    return {
        "step": self.step,
        "world_size": self.world,
        "kl_coef": self.kl.coef,
        "score_stats": self.score_stats.state_dict(),
        "spec": self.spec.model_dump(mode="json"),
    }


def save(self: PPOWorker, root: Location, log: Any) -> None:
    """Save the actor and critic with every rank's RNG state, commit, and prune."""
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train import hashing_engine
    from crucible.jobs.train.checkpoint.save import write_json_local
    from crucible.jobs.train.state import rng_state

    t0 = time.perf_counter()
    stage = ckpt.open_stage(root, self.step, self.rank)
    if self.rank == 0:
        write_json_local(stage / ckpt.STATE, state(self))
    written: dict[str, dict[str, Any]] = {}
    for engine, tag in ((self.actor, ckpt.DS_TAG), (self.critic, CRITIC_TAG)):
        hashing = engine.checkpoint_engine
        if isinstance(hashing, hashing_engine.HashingCheckpointEngine):
            hashing.written.clear()
        engine.save_checkpoint(str(stage), tag=tag, save_latest=False)
        if isinstance(hashing, hashing_engine.HashingCheckpointEngine):
            written.update(hashing.written)
    rng_file = stage / "crucible_state" / f"rank-{self.rank}.pt"
    written[os.path.abspath(rng_file)] = hashing_engine.save_hashed(rng_state(), rng_file)
    nbytes = ckpt.finish_save(root, self.step, stage, written, self.rank, self.world)
    if self.rank == 0:
        ckpt.retain(root, self.spec.checkpoint.keep_last, None)
        seconds = time.perf_counter() - t0
        log.append({"kind": "checkpoint", "step": self.step, "bytes": nbytes,
                    "save_seconds": seconds, "write_seconds": seconds,
                    "path": ckpt.step_path(root, self.step).uri, "time": time.time()})  # fmt: skip
        say(f"checkpoint step-{self.step}: {nbytes / 1e6:.1f} MB in {seconds:.1f} s")


def choose(self: PPOWorker) -> tuple[Location, Path, dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint every rank can load, ``(checkpoint, local directory, manifest,
    crucible state)``; its universal copy when another number of workers saved it."""
    from crucible.jobs.train import checkpoint as ckpt

    root = self.run_dir / "checkpoints"
    root.mkdirs()
    chosen = ckpt.choose_checkpoint(root, self.spec.checkpoint.verify, self.rank, self.world)
    if chosen is None:
        return None
    return (*chosen, ckpt.read_state(chosen[0]))


def resume(self: PPOWorker) -> None:
    """Load the checkpoint :func:`choose` chose (none: start from the initial weights).

    At the same world size every rank's RNG state is restored too; at another, the saved
    streams no longer fit the ranks and the run's generators are seeded from the step.
    """
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.callbacks.runlog import open_metrics
    from crucible.jobs.train.resume import rank_seed
    from crucible.jobs.train.state import seed_everything, set_rng_state

    if self.resume_from is None:
        return
    path, local, _, state = self.resume_from
    self.actor.load_checkpoint(str(local), tag=ckpt.DS_TAG, load_lr_scheduler_states=False)
    self.critic.load_checkpoint(str(local), tag=CRITIC_TAG, load_lr_scheduler_states=False)
    self.step = int(state["step"])
    saved_world = int(state["world_size"])
    if saved_world == self.world:
        set_rng_state(torch.load(Path(local) / "crucible_state" / f"rank-{self.rank}.pt",
                                 weights_only=False))  # fmt: skip
    else:
        seed_everything(rank_seed(self.spec.workers.seed, self.rank, self.step))
    self.kl.coef = float(state["kl_coef"])
    self.score_stats.load_state_dict(state["score_stats"])
    if self.rank == 0:
        log = open_metrics(self.run_dir)
        log.append({"kind": "resume", "step": self.step, "from": path.uri,
                    "world_size": self.world, "saved_world_size": saved_world,
                    "time": time.time()}, sync=True)  # fmt: skip
        log.close()
        workers = "" if saved_world == self.world else f", saved by {saved_world} workers"
        say(f"resumed from {path} (step {self.step}{workers})")
