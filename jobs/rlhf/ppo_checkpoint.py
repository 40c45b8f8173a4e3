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
from crucible.errors import CrucibleError
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


def resume(self: PPOWorker, root: Location) -> None:
    """Load the newest checkpoint every rank can (none: start from the initial weights)."""
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.callbacks.runlog import open_metrics
    from crucible.jobs.train.state import set_rng_state

    chosen = ckpt.choose_checkpoint(root, self.spec.checkpoint.verify, self.rank, self.world)
    if chosen is None:
        return
    path, local, _ = chosen
    state = ckpt.read_state(path)
    if int(state["world_size"]) != self.world:
        raise CrucibleError(
            f"{path} was saved by {state['world_size']} workers: resume a PPO run with "
            "the same workers.num_workers"
        )
    self.actor.load_checkpoint(str(local), tag=ckpt.DS_TAG, load_lr_scheduler_states=False)
    self.critic.load_checkpoint(str(local), tag=CRITIC_TAG, load_lr_scheduler_states=False)
    set_rng_state(torch.load(Path(local) / "crucible_state" / f"rank-{self.rank}.pt",
                             weights_only=False))  # fmt: skip
    self.step = int(state["step"])
    self.kl.coef = float(state["kl_coef"])
    self.score_stats.load_state_dict(state["score_stats"])
    if self.rank == 0:
        log = open_metrics(self.run_dir)
        log.append({"kind": "resume", "step": self.step, "from": path.uri,
                    "world_size": self.world, "time": time.time()}, sync=True)  # fmt: skip
        log.close()
        say(f"resumed from {path} (step {self.step})")
