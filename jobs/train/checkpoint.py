"""Checkpoints: every rank's ZeRO-3 shards plus crucible's state, committed atomically, on any
storage the run's URI names.

Layout of ``<run>/checkpoints/``::

    step-<N>/
        ds/                      DeepSpeed's files: zero_pp_rank_<r>_mp_rank_00_*_states.pt
        zero_to_fp32.py          DeepSpeed's consolidation script (self-contained checkpoint)
        crucible_state/
            state.json           step, samples consumed, reader state, world size, ledger, spec
            rank-<r>.pt          RNG states of rank r
        manifest.json            sha256 + size of every file above; written last
    universal/step-<N>/          a copy converted for another world size (see .reshard)
    latest                       "step-<N>", replaced after the commit (a hint; manifests rule)

Save: DeepSpeed only ever sees a local directory, the *stage*. On a filesystem that renames
(local disk, NFS) the stage is ``step-<N>.tmp`` in place: every rank writes and fsyncs its
files there (hashing them as they are written, see :mod:`.hashing_engine`), rank 0 checks
every rank's shards are present, writes ``manifest.json``, renames the directory to
``step-<N>`` and only then replaces ``latest``. On an object store the stage is in node-local
scratch; each rank uploads the files it owns straight to ``step-<N>/`` and rank 0 writes the
manifest, then ``latest``, after all of them. Either way a crash at any point leaves the
previous checkpoint as the newest committed one, or the new one complete: a ``step-<N>``
without a manifest is never a candidate.

Load: the driver reads manifests only. Each rank verifies the files it owns (sizes, or sizes
and sha256), in parallel with the others; from an object store verifying is fetching them
into node-local scratch, checked on the way. One bad file makes the whole group fall back to
the previous checkpoint (see ``loop.choose_checkpoint``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.cluster.storage import Location, cache_key, scratch_dir
from crucible.errors import CrucibleError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "crucible_state/state.json"
DS_TAG = "ds"
UNIVERSAL = "universal"
_STEP = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^step-(\d+)\.tmp$")
_OWNER = re.compile(r"(?:zero_pp_rank_|^rank-)(\d+)[_.]")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class SaveStats:
    """What one save wrote and how long it took (wall time of the whole commit)."""

    step: int
    path: Location
    bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        """Throughput of the save (all ranks' bytes over the commit's wall time)."""
        return self.bytes / max(self.seconds, 1e-9)


def step_path(root: Location, step: int) -> Location:
    """``<root>/step-<step>``."""
    return root / f"step-{step}"


def committed_steps(root: Location) -> list[int]:
    """Steps of the committed (manifest written) checkpoints under ``root``, ascending."""
    out = []
    for name in root.ls():
        m = _STEP.match(name)
        if m and (root / name / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def owner_rank(relpath: str) -> int:
    """The rank that wrote ``relpath`` (DeepSpeed shard or RNG file), else rank 0.

    Args:
        relpath: a path relative to the checkpoint directory.
    """
    m = _OWNER.search(relpath.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


def owned_by(files: Any, rank: int, world: int) -> list[str]:
    """The entries of ``files`` that ``rank`` of ``world`` handles (writes, hashes, verifies).

    Args:
        files: relative paths (a manifest's ``files`` mapping works too).
        rank: this rank.
        world: ranks of this attempt (may differ from the checkpoint's).
    """
    return sorted(f for f in files if owner_rank(f) % world == rank)


def missing_rank_files(files: set[str] | dict[str, Any], world_size: int) -> list[str]:
    """Per-rank files a ``world_size``-rank checkpoint must hold that ``files`` lacks.

    Each rank writes its ZeRO optimizer shard (``[bf16_]zero_pp_rank_<r>_..._optim_states.pt``),
    its ZeRO-3 model-state file and its RNG state.

    Args:
        files: relative paths present (or listed in the manifest).
        world_size: data-parallel ranks that wrote the checkpoint.
    """
    missing = []
    for r in range(world_size):
        wanted = {
            f"{DS_TAG}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt": re.compile(
                rf"^{DS_TAG}/(bf16_)?zero_pp_rank_{r}_mp_rank_00_optim_states\.pt$"
            ),
            f"{DS_TAG}/zero_pp_rank_{r}_mp_rank_00_model_states.pt": re.compile(
                rf"^{DS_TAG}/zero_pp_rank_{r}_mp_rank_00_model_states\.pt$"
            ),
            f"crucible_state/rank-{r}.pt": re.compile(rf"^crucible_state/rank-{r}\.pt$"),
        }
        for name, pattern in wanted.items():
            if not any(pattern.match(f) for f in files):
                missing.append(name)
    return missing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_files(d: Path) -> list[str]:
    """Every file under local ``d`` as sorted relative POSIX paths (the manifest excluded)."""
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST
    )


# --- save -------------------------------------------------------------------------------------


def stage_dir(root: Location, step: int, nonce: str) -> Path:
    """The local directory DeepSpeed saves step ``step`` into (see the module docstring).

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


# --- load -------------------------------------------------------------------------------------


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
    (export and tools; training ranks split the work, see ``loop.choose_checkpoint``).

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


def retain(root: Location, keep_last: int, keep_every: int | None) -> list[int]:
    """Delete committed checkpoints that the policy does not keep; return the deleted steps.

    Kept: the newest ``keep_last``, plus every step that is a multiple of ``keep_every``.
    Leftovers of older unfinished saves are removed too. A checkpoint's manifest goes first,
    so a deletion cut short never leaves something that looks committed.

    Args:
        root: the checkpoints directory.
        keep_last: newest checkpoints kept.
        keep_every: also keep steps divisible by this (None: none).
    """
    steps = committed_steps(root)
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    newest = steps[-1] if steps else -1
    deleted = []
    for s in steps:
        if s not in keep:
            for d in (step_path(root, s), root / UNIVERSAL / f"step-{s}"):
                (d / MANIFEST).rm()
                d.rmtree()
            deleted.append(s)
    for name in root.ls():
        m = _TMP.match(name) or _STEP.match(name)
        if m and int(m.group(1)) < newest and int(m.group(1)) not in steps:
            (root / name).rmtree()  # an unfinished save older than the newest commit
    return deleted
