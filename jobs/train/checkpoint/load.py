"""Loading a checkpoint: reading manifests, checking (or fetching) the files a rank owns, and
choosing the newest checkpoint that every rank can load."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from crucible.cluster.storage import Location, cache_key, scratch_dir, sha256_file
from crucible.errors import CrucibleError
from crucible.jobs.train.checkpoint.in_flight import IN_FLIGHT
from crucible.jobs.train.checkpoint.layout import (
    MANIFEST,
    STATE,
    UNIVERSAL,
    committed_steps,
    missing_rank_files,
    owned_by,
    shared_files,
    step_path,
)
from crucible.jobs.train.console import say

log = logging.getLogger(__name__)


def read_manifest(path: Location) -> dict[str, Any]:
    """The manifest of a committed checkpoint."""
    data: dict[str, Any] = (path / MANIFEST).read_json()
    return data


def read_state(path: Location) -> dict[str, Any]:
    """crucible's state (``crucible_state/state.json``) of a checkpoint."""
    data: dict[str, Any] = (path / STATE).read_json()
    return data


def check_manifest(path: Location) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of ``path`` if it describes a whole checkpoint, else the reason not.

    Args:
        path: a ``step-<N>`` directory.
    """
    mpath = path / MANIFEST
    try:
        manifest = read_manifest(path)
        entries = manifest["files"]
        world = int(manifest["world_size"])
    except FileNotFoundError:
        return None, f"{mpath} is missing (the save did not finish)"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{mpath} is unreadable ({e})"
    absent = missing_rank_files(entries, world)
    if absent:
        return None, f"{path / absent[0]} is not in the manifest (a rank's shards were not saved)"
    return manifest, None


def check_universal(path: Location) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of a universal copy, or why there is none.

    Args:
        path: ``universal/step-<N>``.
    """
    try:
        return read_manifest(path), None
    except FileNotFoundError:
        return None, f"{path} does not exist: no copy of it for this world size"
    except ValueError as e:
        return None, f"{path / MANIFEST} is unreadable ({e})"


def fetch(
    path: Location, rels: list[str], manifest: dict[str, Any], mode: str = "sha256"
) -> tuple[Path, str | None]:
    """Make files ``rels`` of checkpoint ``path`` available locally, verified; return the local
    checkpoint directory and the first problem (None: all good).

    On a local filesystem the files are checked where they are (sizes; and sha256 with
    ``mode="sha256"``). From an object store they are fetched into node-local scratch,
    always checked against size and sha256 on the way (the bytes are read anyway).

    Args:
        path: a committed ``step-<N>`` (or universal) directory.
        rels: the manifest entries to check / fetch.
        manifest: its manifest.
        mode: ``sha256`` or ``size``.
    """
    entries = manifest["files"]
    if path.is_local:
        local = path.local_path
        for rel in rels:
            p, want = local / rel, entries[rel]
            if not p.is_file():
                return local, f"{path / rel} is missing"
            size = p.stat().st_size
            if size != want["bytes"]:
                return local, f"{path / rel} has {size} bytes, the manifest says {want['bytes']}"
            if mode == "sha256" and sha256_file(p) != want["sha256"]:
                return local, f"{path / rel} fails its sha256 check"
        return local, None
    from filelock import FileLock

    local = scratch_dir("checkpoints-load", cache_key(path.uri + str(manifest.get("created"))))
    with FileLock(str(local / ".lock")):  # ranks of a node may share files (universal copies)
        for rel in rels:
            if (local / rel).is_file():  # present means checked: downloads are atomic
                continue
            try:
                (path / rel).download(local / rel, entries[rel]["sha256"], entries[rel]["bytes"])
            except CrucibleError as e:
                return local, str(e)
            except OSError as e:
                return local, f"{path / rel}: {e}"
    return local, None


def latest_committed(root: Location) -> tuple[Location, dict[str, Any]] | None:
    """The newest checkpoint whose manifest is whole (the driver's choice: manifests only)."""
    for step in reversed(committed_steps(root)):
        path = step_path(root, step)
        manifest, bad = check_manifest(path)
        if manifest is not None:
            return path, manifest
        print(f"warning: skipping checkpoint {path.name}: {bad}", flush=True)
    return None


def latest_valid(root: Location, mode: str = "sha256") -> Location | None:
    """The newest checkpoint under ``root`` whose every file verifies, checked in this process
    (export and tools; training ranks split the work, see :func:`choose_checkpoint`).

    Args:
        root: the checkpoints directory.
        mode: ``sha256`` or ``size``.
    """
    for step in reversed(committed_steps(root)):
        path = step_path(root, step)
        bad = verify(path, mode)
        if bad is None:
            return path
        log.warning("skipping checkpoint %s: %s", path.name, bad)
        print(f"warning: skipping checkpoint {path.name}: {bad}", flush=True)
    return None


def verify(path: Location, mode: str = "sha256") -> str | None:
    """Check a whole committed checkpoint here; None if good, else the reason naming the file.

    Args:
        path: a ``step-<N>`` directory.
        mode: ``sha256`` (contents) or ``size`` (sizes only).
    """
    manifest, bad = check_manifest(path)
    if manifest is None:
        return bad
    present = path.walk()
    for rel in sorted(manifest["files"]):
        want = manifest["files"][rel]
        if rel not in present:
            return f"{path / rel} is missing"
        if present[rel] != want["bytes"]:
            return f"{path / rel} has {present[rel]} bytes, the manifest says {want['bytes']}"
        if mode == "sha256" and (path / rel).sha256() != want["sha256"]:
            return f"{path / rel} fails its sha256 check"
    return None


def choose_checkpoint(
    root: Location, mode: str, rank: int, world: int
) -> tuple[Location, Path, dict[str, Any]] | None:
    """The newest checkpoint that every rank agrees it can load: ``(checkpoint, local
    directory DeepSpeed loads from, manifest)``.

    Each rank checks the files it owns (all of the universal copy when the world size changed,
    since every rank reads every parameter's file); from an object store checking them is
    fetching them into node-local scratch. One rank's problem makes the whole group move on
    to the previous checkpoint: one collective decision. A save of this process still in
    flight is finished first (a rollback goes back to it if it is committed).

    Args:
        root: the checkpoints directory.
        mode: ``sha256`` or ``size``.
        rank: this rank.
        world: number of ranks.
    """
    import torch.distributed as dist

    IN_FLIGHT.join()
    box: list[Any] = [committed_steps(root) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one listing, the same for every rank
    for step in reversed(box[0]):
        path = step_path(root, step)
        manifest, bad = check_manifest(path)
        local = None
        if manifest is not None and int(manifest["world_size"]) != world:
            uni = root / UNIVERSAL / path.name
            umanifest, ubad = check_universal(uni)
            if umanifest is None:
                bad = ubad
            else:
                local, bad = fetch(uni, sorted(umanifest["files"]), umanifest, mode)
        elif manifest is not None:
            mine = owned_by(manifest["files"], rank, world)
            if not path.is_local:  # from an object store every rank needs its own copy
                mine = sorted(set(mine) | set(shared_files(manifest["files"])))
            local, bad = fetch(path, mine, manifest, mode)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, bad)
        problems = [b for b in gathered if b]
        if not problems and manifest is not None and local is not None:
            return path, local, manifest
        if rank == 0:
            say(f"warning: skipping checkpoint {path.name}: {problems[0] if problems else bad}")
    return None
