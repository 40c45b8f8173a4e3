"""Checkpoints: every rank's ZeRO-3 shards plus crucible's state, committed atomically.

Layout of ``<run>/checkpoints/``::

    step-<N>/
        ds/                      DeepSpeed's files: zero_pp_rank_<r>_mp_rank_00_*_states.pt
        zero_to_fp32.py          DeepSpeed's consolidation script (self-contained checkpoint)
        crucible_state/
            state.json           step, samples consumed, reader state, world size, ledger, spec
            rank-<r>.pt          RNG states of rank r
        manifest.json            sha256 + size of every file above; written last
    latest                       "step-<N>", replaced atomically after the commit

Commit protocol: every rank writes into ``step-<N>.tmp/`` and fsyncs the files it wrote
(hashing them as they are written, see :mod:`.hashing_engine`); rank 0 checks that every
rank's shards are there, writes ``manifest.json``, fsyncs the directories, renames
``step-<N>.tmp`` to ``step-<N>`` and only then replaces ``latest``. A crash at any point
leaves either the previous checkpoint as the newest valid one, or the new one complete.

Each rank writes its own shards straight to the shared path: nothing depends on Ray Train's
checkpoint upload (which has lost non-zero ranks' shards before).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.errors import CrucibleError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "crucible_state/state.json"
DS_TAG = "ds"
_STEP = re.compile(r"^step-(\d+)$")
_OWNER = re.compile(r"(?:zero_pp_rank_|^rank-)(\d+)[_.]")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class SaveStats:
    """What one save wrote and how long it took (wall time of the whole commit)."""

    step: int
    path: Path
    bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        """Throughput of the save (all ranks' bytes over the commit's wall time)."""
        return self.bytes / max(self.seconds, 1e-9)


def step_path(root: Path, step: int) -> Path:
    """``<root>/step-<step>``."""
    return root / f"step-{step}"


def committed_steps(root: Path) -> list[int]:
    """Steps of committed (renamed) checkpoint directories under ``root``, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP.match(p.name)))


def owner_rank(relpath: str) -> int:
    """The rank that wrote ``relpath`` (DeepSpeed shard or RNG file), else rank 0.

    Args:
        relpath: a path relative to the checkpoint directory.
    """
    m = _OWNER.search(Path(relpath).name)
    return int(m.group(1)) if m else 0


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
    """Hex sha256 of a file, read in 8 MiB chunks."""
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
    """Every file under ``d`` as sorted relative POSIX paths (the manifest excluded)."""
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def hash_own_files(
    d: Path, rank: int, world_size: int, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """fsync and hash the files of ``d`` that ``rank`` wrote: ``{relpath: {sha256, bytes}}``.

    Args:
        d: the checkpoint directory being written.
        rank: this rank; it handles the files it owns (see :func:`owner_rank`).
        world_size: ranks writing the checkpoint.
        known: ``{abspath: {sha256, bytes}}`` of files already hashed and fsynced as they were
            written; taken as they are when the size on disk agrees, re-read otherwise.
    """
    known = known or {}
    out = {}
    for rel in list_files(d):
        if owner_rank(rel) % world_size != rank:
            continue
        p = d / rel
        size = p.stat().st_size
        got = known.get(os.path.abspath(p))
        if got is not None and got["bytes"] == size:
            out[rel] = {"sha256": got["sha256"], "bytes": size}
            continue
        fsync_path(p)
        out[rel] = {"sha256": sha256_file(p), "bytes": size}
    return out


def write_json_durable(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync it, and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(root: Path, step: int, files: dict[str, dict[str, Any]], world_size: int) -> Path:
    """Rank 0's half of a save: check, write the manifest, rename, point ``latest`` at it.

    Args:
        root: the checkpoints directory.
        step: the step being committed (its files are in ``step-<step>.tmp``).
        files: ``{relpath: {sha256, bytes}}`` gathered from every rank.
        world_size: ranks that wrote it; each one's shards must be present.

    Raises:
        CrucibleError: a rank's shard files are missing (the checkpoint is not committed).
    """
    tmp = root / f"step-{step}.tmp"
    on_disk = set(list_files(tmp))
    missing = missing_rank_files(on_disk & set(files), world_size)
    unhashed = sorted(on_disk - set(files))
    if missing or unhashed:
        raise CrucibleError(
            f"checkpoint {tmp} is incomplete (missing {missing[:3]}, unhashed {unhashed[:3]}); "
            "it was not committed and the previous checkpoint stays the latest"
        )
    for d in sorted({(tmp / f).parent for f in files}, key=lambda p: -len(p.parts)):
        fsync_path(d)
    manifest = {
        "step": step,
        "world_size": world_size,
        "created": time.time(),
        "total_bytes": sum(v["bytes"] for v in files.values()),
        "files": files,
    }
    write_json_durable(tmp / MANIFEST, manifest)
    fsync_path(tmp)
    final = step_path(root, step)
    if final.exists():  # a re-run of the same step after a restart: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    fsync_path(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    fsync_path(root)
    return final


def verify(path: Path, mode: str = "sha256", files: list[str] | None = None) -> str | None:
    """Check a committed checkpoint; return None if good, else the reason naming the bad file.

    Args:
        path: a ``step-<N>`` directory.
        mode: ``sha256`` (contents) or ``size`` (sizes only).
        files: check only these manifest entries (ranks split the work); None: all.
    """
    mpath = path / MANIFEST
    if not mpath.exists():
        return f"{mpath} is missing (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        entries: dict[str, dict[str, Any]] = manifest["files"]
        world = int(manifest["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        return f"{mpath} is unreadable ({e})"
    absent = missing_rank_files(entries, world)
    if absent:
        return f"{path / absent[0]} is not in the manifest (a rank's shards were not saved)"
    for rel in files if files is not None else sorted(entries):
        p, want = path / rel, entries[rel]
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{p} has {size} bytes, the manifest says {want['bytes']}"
        if mode == "sha256" and sha256_file(p) != want["sha256"]:
            return f"{p} fails its sha256 check"
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a committed checkpoint."""
    return json.loads((path / MANIFEST).read_text())


def read_state(path: Path) -> dict[str, Any]:
    """crucible's state (``crucible_state/state.json``) of a checkpoint."""
    return json.loads((path / STATE).read_text())


def latest_valid(root: Path, mode: str = "sha256") -> Path | None:
    """The newest checkpoint under ``root`` that verifies; bad ones are skipped with a warning.

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


def retain(root: Path, keep_last: int, keep_every: int | None) -> list[int]:
    """Delete committed checkpoints that the policy does not keep; return the deleted steps.

    Kept: the newest ``keep_last``, plus every step that is a multiple of ``keep_every``.
    Leftover ``.tmp`` directories of older steps (from crashed saves) are removed too.

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
            shutil.rmtree(step_path(root, s), ignore_errors=True)
            shutil.rmtree(root / "universal" / f"step-{s}", ignore_errors=True)
            deleted.append(s)
    for p in root.glob("step-*.tmp"):
        m = re.match(r"^step-(\d+)\.tmp$", p.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)
    return deleted
