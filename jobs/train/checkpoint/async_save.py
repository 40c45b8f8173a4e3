"""Asynchronous saves: the loop is blocked only while DeepSpeed builds the state dicts and
until they are copied to host memory; the files are written, hashed and committed by a
background thread on every rank.

The blocked part (:func:`take_snapshot`, a collective) opens the stage as a synchronous save
does and lets DeepSpeed's own ``save_checkpoint`` build every file's state dict, which a
capturing checkpoint engine takes a deferred host copy of (pinned on GPUs) instead of
writing (see :mod:`.capture_engine`, :mod:`.host_copy`); the RNG states and crucible's state
are taken then too. The background part (:func:`write_snapshot`) first fills the copies
(staging) while the loop runs the next step's forward and backward, which change none of
the state (the loop waits for the staging, :meth:`AsyncSaver.wait_staged`, before its
optimizer step), then writes each copy with the hashing ``torch.save``, so the files are
those a synchronous save writes, and then runs the same
commit (:func:`~.save.finish_save`) over a gloo process group of its own, so that its
collectives never meet the training loop's: every rank's files, then rank 0's manifest,
then ``latest``. A crash or kill while a save is in flight leaves it uncommitted and the
previous checkpoint the newest one.

One save is in flight at most (:data:`~.in_flight.IN_FLIGHT`): :meth:`AsyncSaver.start`
refuses a second, and its caller waits for the previous one first.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.cluster.storage import Location
from crucible.jobs.train.checkpoint.host_copy import HostBuffers, HostCopy, Stager
from crucible.jobs.train.checkpoint.in_flight import IN_FLIGHT, SaveSlot
from crucible.jobs.train.checkpoint.layout import DS_TAG, STATE, step_path
from crucible.jobs.train.checkpoint.save import (
    SaveStats,
    base_frozen,
    finish_save,
    open_stage,
    write_json_local,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass
class Snapshot:
    """One rank's part of a save, in host memory: what the background thread writes."""

    step: int
    stage: Path
    files: list[tuple[str, HostCopy]]
    """DeepSpeed's files: path in the stage and its state dict's (deferred) copy."""
    stager: Stager
    """Fills the copies (in the background, first)."""
    rng: dict[str, Any]
    state: dict[str, Any] | None
    """crucible's state (rank 0's is written; None elsewhere)."""
    zipfile: bool
    started: float
    """``time.perf_counter()`` when the loop began to wait for this save."""
    started_at: float
    """The same moment in unix time."""
    blocked: float
    """Seconds the loop was blocked taking it (from then on, in one piece; a wait for its
    staging comes on top)."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held in host memory."""
        return sum(c.nbytes for _, c in self.files)


def supports_async(engine: DeepSpeedEngine) -> bool:
    """Whether ``engine`` saves through crucible's hashing ``torch.save`` engine, whose files
    a snapshot reproduces (other DeepSpeed writers are saved synchronously).

    Args:
        engine: the DeepSpeed engine.
    """
    from crucible.jobs.train.hashing_engine import HashingCheckpointEngine

    return isinstance(getattr(engine, "checkpoint_engine", None), HashingCheckpointEngine)


def take_snapshot(
    engine: DeepSpeedEngine,
    root: Location,
    step: int,
    state: dict[str, Any],
    rank: int,
    buffers: HostBuffers,
) -> Snapshot:
    """Every rank: take deferred host copies of what a save of step ``step`` writes (a
    collective); nothing may change the state until ``stager`` has run.

    Args:
        engine: the DeepSpeed engine (a hashing checkpoint engine: :func:`supports_async`).
        root: the checkpoints directory.
        step: optimizer steps taken.
        state: crucible's state (rank 0's is written).
        rank: this rank.
        buffers: host memory for the copies.
    """
    from crucible.jobs.train.checkpoint.capture_engine import capturing
    from crucible.jobs.train.state import rng_state

    t0, t0_unix = time.perf_counter(), time.time()
    zipfile = bool(engine.checkpoint_engine.zipfile_serialization)
    stage = open_stage(root, step, rank)
    with capturing(engine, buffers) as capture:
        engine.save_checkpoint(
            str(stage), tag=DS_TAG, save_latest=False,
            exclude_frozen_parameters=base_frozen(state),
        )  # fmt: skip
    stager = Stager([c for _, c in capture.captured])
    frozen = json.loads(json.dumps(state)) if rank == 0 else None  # nothing shared with the loop
    return Snapshot(step, stage, capture.captured, stager, rng_state(), frozen, zipfile, t0,
                    t0_unix, time.perf_counter() - t0)  # fmt: skip


def write_snapshot(
    snap: Snapshot,
    root: Location,
    rank: int,
    world: int,
    group: Any = None,
    stall: bool = False,
) -> SaveStats:
    """Every rank, in the background: write a snapshot's files and commit the checkpoint.

    Args:
        snap: this rank's snapshot.
        root: the checkpoints directory.
        rank: this rank.
        world: number of ranks.
        group: the process group of the commit's collectives (not the training loop's).
        stall: tests only: stop once the files are written, before the commit, for good.

    Raises:
        CrucibleError: on every rank, when the checkpoint was not committed.
    """
    from crucible.jobs.train.hashing_engine import save_hashed

    t0 = time.perf_counter()
    written: dict[str, dict[str, Any]] = {}
    error = None
    try:
        snap.stager.run()
        if snap.state is not None:
            write_json_local(snap.stage / STATE, snap.state)
        for path, copy in snap.files:
            written[os.path.abspath(path)] = save_hashed(copy.restore(), Path(path), snap.zipfile)
        rng_file = snap.stage / "crucible_state" / f"rank-{rank}.pt"
        written[os.path.abspath(rng_file)] = save_hashed(snap.rng, rng_file)
    except Exception as e:
        error = f"rank {rank}: {e}"
    if stall:
        threading.Event().wait()  # until the test kills the process
    nbytes = finish_save(root, snap.step, snap.stage, written, rank, world, error, group)
    end = time.perf_counter()
    blocked = ((snap.started_at, snap.started_at + snap.blocked),)
    return SaveStats(snap.step, step_path(root, snap.step), nbytes, end - snap.started,
                     blocked_spans=blocked, write=end - t0)  # fmt: skip


class AsyncSaver:
    """One rank's asynchronous saves, written in the background one at a time.

    A save is handed back (:meth:`poll`, :meth:`wait`) as soon as it is committed; it stays in
    flight until its background work after the commit (the launcher's report) is done too.

    Args:
        root: the checkpoints directory.
        rank: this rank.
        world: number of ranks.
        pinned: copy into page-locked host memory (GPU ranks).
        stall_steps: tests only: the saves of these steps never commit (see
            :func:`write_snapshot`).
        slot: where the save in flight is kept (the process's own by default).
    """

    def __init__(
        self,
        root: Location,
        rank: int,
        world: int,
        pinned: bool,
        stall_steps: frozenset[int] = frozenset(),
        slot: SaveSlot = IN_FLIGHT,
    ) -> None:
        self.root, self.rank, self.world = root, rank, world
        self.buffers = HostBuffers(pinned)
        self.stall_steps = stall_steps
        self.slot = slot
        self._group: Any = None
        self._snapshot: Snapshot | None = None
        self._committed: SaveStats | None = None  # set by the background thread
        self._handed = False

    @property
    def in_flight(self) -> bool:
        """A save was started and its background work is not known to be over."""
        return self._snapshot is not None

    @property
    def step(self) -> int | None:
        """The step of the save in flight (None: none)."""
        return None if self._snapshot is None else self._snapshot.step

    def start(
        self,
        engine: DeepSpeedEngine,
        step: int,
        state: dict[str, Any],
        on_commit: Callable[[SaveStats], SaveStats] | None = None,
        then: Callable[[SaveStats], None] | None = None,
        waited: float = 0.0,
    ) -> Snapshot:
        """Every rank: snapshot step ``step`` and start writing it (a collective). The
        engine's state must not change until :meth:`wait_staged` returns.

        Args:
            engine: the DeepSpeed engine.
            step: optimizer steps taken.
            state: crucible's state (rank 0's is written).
            on_commit: run in the background once the checkpoint is committed (retention);
                returns the stats handed back.
            then: run in the background after that (the launcher's report); the save is in
                flight until it returns.
            waited: seconds the loop already waited for the previous save (counted as
                blocked by this one).

        Raises:
            RuntimeError: a save is in flight (wait for it first: never two).
        """
        import torch.distributed as dist

        if self.slot.busy or self._snapshot is not None:
            raise RuntimeError("a checkpoint save is already in flight: wait for it first")
        if self._group is None:  # every rank gets here at the same save
            self._group = dist.new_group(backend="gloo")
        snap = take_snapshot(engine, self.root, step, state, self.rank, self.buffers)
        snap.started -= waited
        snap.started_at -= waited
        snap.blocked += waited
        group, stall = self._group, step in self.stall_steps

        def work() -> SaveStats:
            stats = write_snapshot(snap, self.root, self.rank, self.world, group, stall)
            if on_commit is not None:
                stats = on_commit(stats)
            self._committed = stats
            if then is not None:
                then(stats)
            return stats

        self._snapshot, self._committed, self._handed = snap, None, False
        self.slot.start(work, name=f"checkpoint-save-step-{step}")
        return snap

    def wait_staged(self) -> float:
        """Wait until the save in flight holds its own copy of the state, so that it may
        change (call it before the optimizer step); return the seconds waited (0: none in
        flight, or staged already)."""
        return 0.0 if self._snapshot is None else self._snapshot.stager.wait()

    def poll(self) -> SaveStats | None:
        """The save in flight once it is committed, handed back once (None while it is
        being written, if it was handed back already, or if there is none).

        Raises:
            CrucibleError: it failed (not committed; the previous checkpoint is the newest).
        """
        return self._take(block=False)

    def wait(self) -> SaveStats | None:
        """Wait until the save in flight is over; hand it back unless it was already (None:
        handed back before, or none).

        Raises:
            CrucibleError: it failed (not committed; the previous checkpoint is the newest).
        """
        return self._take(block=True)

    def _take(self, block: bool) -> SaveStats | None:
        if self._snapshot is None:
            return None
        fut = self.slot.take(block)
        if fut is None:  # still running: committed already?
            if self._committed is None or self._handed:
                return None
            self._handed = True
            return self._committed
        snap, self._snapshot = self._snapshot, None
        self.buffers.give_back([s for _, c in snap.files for s, _ in c.storages])
        stats: SaveStats = fut.result()
        if self._handed:
            return None
        self._handed = True
        return stats
