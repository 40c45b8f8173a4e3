"""Saving a checkpoint: every rank writes into its stage, hashes and publishes the files it
owns; rank 0 checks that every rank's shards are there and commits (manifest last, then
``latest``). See the package docstring for the protocol."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.cluster.storage import Location, cache_key, fsync_path, scratch_dir, sha256_file
from crucible.errors import CrucibleError
from crucible.jobs.train.checkpoint.layout import (
    DS_TAG,
    MANIFEST,
    STATE,
    list_files,
    missing_rank_files,
    owned_by,
    step_path,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass(frozen=True)
class SaveStats:
    """What one save wrote and how long it took."""

    step: int
    path: Location
    bytes: int
    seconds: float
    """Wall time from the start of the save to its commit."""
    removed: tuple[int, ...] = ()
    """Older checkpoints retention deleted after this one was committed."""
    blocked_spans: tuple[tuple[float, float], ...] | None = None
    """Unix (start, end) of each wait of the training loop for this save (None: one wait, the
    whole save, from the ``t0`` that ``on_save`` gets). A synchronous save has one; so does an
    asynchronous one, its copy to host memory (after any wait for the previous save, and at
    the end of a run up to its own commit), plus one more when the loop ended while it was
    in flight and waited for it (a stop without a checkpoint, a failure)."""
    write: float | None = None
    """Seconds spent writing, hashing and committing, in the background when asynchronous
    (None: all of ``seconds``)."""
    staging_wait: float = 0.0
    """Seconds the loop waited, inside the step after an asynchronous save, for the save to
    finish copying the state to host memory (not in ``blocked_spans``: the step's ledger
    record bills them)."""

    @property
    def blocked_seconds(self) -> float:
        """Seconds the training loop was blocked by this save (its spans and its staging
        wait)."""
        if self.blocked_spans is None:
            return self.seconds + self.staging_wait
        return sum(t1 - t0 for t0, t1 in self.blocked_spans) + self.staging_wait

    @property
    def write_seconds(self) -> float:
        """Seconds spent writing, hashing and committing."""
        return self.seconds if self.write is None else self.write

    @property
    def bytes_per_s(self) -> float:
        """Throughput of the writing (all ranks' bytes over the write's wall time)."""
        return self.bytes / max(self.write_seconds, 1e-9)


def stage_dir(root: Location, step: int, nonce: str) -> Path:
    """The local directory DeepSpeed saves step ``step`` into (see the package docstring).

    Args:
        root: the checkpoints directory.
        step: the step being saved.
        nonce: the same on every rank of one save (rank 0's choice), so that the ranks of a
            node share one fresh directory in node-local scratch.
    """
    if root.renames and root.is_local:
        return root.local_path / f"step-{step}.tmp"
    return scratch_dir("checkpoints", cache_key(root.uri), f"step-{step}-{nonce}")


def clear_for_save(root: Location, step: int) -> None:
    """Rank 0, before a save: remove what an earlier attempt at the same step left.

    Args:
        root: the checkpoints directory.
        step: the step about to be saved.
    """
    if root.renames and root.is_local:
        shutil.rmtree(root.local_path / f"step-{step}.tmp", ignore_errors=True)
        root.mkdirs()
        return
    final = step_path(root, step)
    (final / MANIFEST).rm()  # never committed while its files are replaced
    final.rmtree()


def hash_own_files(
    d: Path, rank: int, world_size: int, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """fsync and hash the files of local ``d`` that ``rank`` wrote: ``{relpath: {sha256, bytes}}``.

    Args:
        d: the stage being written.
        rank: this rank; it handles the files it owns (see :func:`owner_rank`).
        world_size: ranks writing the checkpoint.
        known: ``{abspath: {sha256, bytes}}`` of files already hashed and fsynced as they were
            written; taken as they are when the size on disk agrees, re-read otherwise.
    """
    known = known or {}
    out = {}
    for rel in owned_by(list_files(d), rank, world_size):
        p = d / rel
        size = p.stat().st_size
        got = known.get(os.path.abspath(p))
        if got is not None and got["bytes"] == size:
            out[rel] = {"sha256": got["sha256"], "bytes": size}
            continue
        fsync_path(p)
        out[rel] = {"sha256": sha256_file(p), "bytes": size}
    return out


def publish_own(root: Location, step: int, stage: Path, files: dict[str, dict[str, Any]]) -> None:
    """A rank's files from its stage to ``step-<N>/`` (object stores; in place elsewhere).

    Args:
        root: the checkpoints directory.
        step: the step being saved.
        stage: this rank's local stage.
        files: this rank's files and their digests (from :func:`hash_own_files`).

    Raises:
        CrucibleError: an upload changed a file (its digest differs).
    """
    if root.renames and root.is_local:
        return
    final = step_path(root, step)
    for rel, want in files.items():
        got = (final / rel).upload(stage / rel)
        if got["sha256"] != want["sha256"]:
            raise CrucibleError(f"{final / rel}: the uploaded bytes differ from those saved")


def commit(
    root: Location, step: int, files: dict[str, dict[str, Any]], world_size: int
) -> Location:
    """Rank 0's half of a save: check every rank's files, write the manifest (and rename the
    stage where the filesystem renames), then point ``latest`` at it.

    Args:
        root: the checkpoints directory.
        step: the step being committed.
        files: ``{relpath: {sha256, bytes}}`` gathered from every rank.
        world_size: ranks that wrote it; each one's shards must be present.

    Raises:
        CrucibleError: a rank's shard files are missing (the checkpoint is not committed).
    """
    final = step_path(root, step)
    if root.renames and root.is_local:
        tmp = root.local_path / f"step-{step}.tmp"
        present = set(list_files(tmp))
    else:
        present = set(final.walk()) - {MANIFEST}
    missing = missing_rank_files(present & set(files), world_size)
    unhashed = sorted(present - set(files))
    if missing or unhashed:
        raise CrucibleError(
            f"checkpoint {final} is incomplete (missing {missing[:3]}, unhashed "
            f"{unhashed[:3]}); it was not committed and the previous checkpoint stays the latest"
        )
    manifest = {
        "step": step,
        "world_size": world_size,
        "created": time.time(),
        "total_bytes": sum(v["bytes"] for v in files.values()),
        "files": files,
    }
    if root.renames and root.is_local:
        for d in sorted({(tmp / f).parent for f in files}, key=lambda p: -len(p.parts)):
            fsync_path(d)
        (root / f"step-{step}.tmp" / MANIFEST).write_json(manifest)
        if final.exists():  # a re-run of the same step after a restart: replace it
            shutil.rmtree(final.local_path)
        os.replace(tmp, final.local_path)
        fsync_path(root.local_path)
    else:
        (final / MANIFEST).write_json(manifest)
    (root / "latest").write_text(final.name + "\n")
    return final


def open_stage(root: Location, step: int, rank: int) -> Path:
    """Every rank, at the start of a save: the local stage, emptied of an earlier attempt's
    files at this step and ready for DeepSpeed (a collective).

    Args:
        root: the checkpoints directory.
        step: the step being saved.
        rank: this rank.
    """
    import torch.distributed as dist

    box: list[Any] = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    stage = stage_dir(root, step, box[0])
    if rank == 0:
        clear_for_save(root, step)  # a crashed earlier attempt's partial save
        (stage / "crucible_state").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    (stage / "crucible_state").mkdir(parents=True, exist_ok=True)  # another node's stage
    return stage


def finish_save(
    root: Location,
    step: int,
    stage: Path,
    written: dict[str, dict[str, Any]],
    rank: int,
    world: int,
    error: str | None = None,
    group: Any = None,
) -> int:
    """Every rank, once it has written its files: hash and publish them, and rank 0 commits
    the checkpoint when every rank's are there. Returns the bytes of all ranks' files.

    A rank that failed to write says so (``error``) and still takes part, so that no rank
    waits for it and the checkpoint is committed by none.

    Args:
        root: the checkpoints directory.
        step: the step being saved.
        stage: this rank's stage.
        written: ``{abspath: {sha256, bytes}}`` of files hashed as they were written.
        rank: this rank.
        world: number of ranks.
        error: why this rank's files are not all written (None: they are).
        group: the process group of the collectives (None: the default one).

    Raises:
        CrucibleError: on every rank, when the checkpoint was not committed.
    """
    import torch.distributed as dist

    dist.barrier(group=group)  # every rank's files are written before anyone lists them
    files: dict[str, dict[str, Any]] = {}
    if error is None:
        try:
            files = hash_own_files(stage, rank, world, known=written)
            publish_own(root, step, stage, files)
        except Exception as e:
            error = f"rank {rank}: {e}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (files, error), group=group)
    problems = [e for _, e in gathered if e]
    outcome: list[Any] = [problems[0] if problems else None]
    if rank == 0 and not problems:
        merged = {k: v for part, _ in gathered for k, v in part.items()}
        try:
            commit(root, step, merged, world)
        except Exception as e:
            outcome = [str(e)]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if not (root.renames and root.is_local):
        shutil.rmtree(stage, ignore_errors=True)  # uploaded: the node-local copy goes
    if outcome[0]:
        raise CrucibleError(f"checkpoint step-{step} was not committed: {outcome[0]}")
    return sum(v["bytes"] for part, _ in gathered for v in part.values())


def save(
    engine: DeepSpeedEngine,
    root: Location,
    step: int,
    state: dict[str, Any],
    rank: int,
    world: int,
) -> SaveStats:
    """Save every rank's shards + RNG state and commit the checkpoint, all before returning
    (every rank calls it; :mod:`.async_save` is the same save written in the background).

    Args:
        engine: the DeepSpeed engine.
        root: the checkpoints directory.
        step: optimizer steps taken.
        state: crucible's state (rank 0's is written).
        rank: this rank.
        world: number of ranks.
    """
    from crucible.jobs.train import hashing_engine  # imports DeepSpeed: after DS_ACCELERATOR
    from crucible.jobs.train.state import rng_state

    t0 = time.perf_counter()
    stage = open_stage(root, step, rank)
    if rank == 0:
        write_json_local(stage / STATE, state)
    hashing = engine.checkpoint_engine
    is_hashing = isinstance(hashing, hashing_engine.HashingCheckpointEngine)
    written: dict[str, dict[str, Any]] = hashing.written if is_hashing else {}
    written.clear()
    engine.save_checkpoint(
        str(stage), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=base_frozen(state)
    )
    rng_file = stage / "crucible_state" / f"rank-{rank}.pt"
    written[os.path.abspath(rng_file)] = hashing_engine.save_hashed(rng_state(), rng_file)
    nbytes = finish_save(root, step, stage, written, rank, world)
    return SaveStats(step, step_path(root, step), nbytes, time.perf_counter() - t0)


def base_frozen(state: dict[str, Any]) -> bool:
    """Whether a checkpoint leaves out the model's frozen parameters: a LoRA run's are its
    base, ``<run>/base`` (sha256-checked), loaded into the model before every resume, so its
    checkpoints hold the adapters alone.

    Args:
        state: the checkpoint's crucible state (its ``spec``).
    """
    return state.get("spec", {}).get("lora") is not None


def write_json_local(path: Path, data: Any) -> None:
    """JSON to a local file, fsynced (part of a checkpoint's stage).

    Args:
        path: the file.
        data: JSON-serialisable.
    """
    with path.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
