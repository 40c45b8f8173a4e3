"""Where a checkpoint's files live and who owns them: names, listings, per-rank ownership (the
file-level primitives, sha256 and fsync, are the storage layer's)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from crucible.cluster.storage import Location

MANIFEST = "manifest.json"
STATE = "crucible_state/state.json"
DS_TAG = "ds"
UNIVERSAL = "universal"
STEP_NAME = re.compile(r"^step-(\d+)$")
TMP_NAME = re.compile(r"^step-(\d+)\.tmp$")
_OWNER = re.compile(r"(?:zero_pp_rank_|^rank-)(\d+)[_.]")


def step_path(root: Location, step: int) -> Location:
    """``<root>/step-<step>``."""
    return root / f"step-{step}"


def committed_steps(root: Location) -> list[int]:
    """Steps of the committed (manifest written) checkpoints under ``root``, ascending."""
    out = []
    for name in root.ls():
        m = STEP_NAME.match(name)
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


def owned_by(files: Iterable[str], rank: int, world: int) -> list[str]:
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


def list_files(d: Path) -> list[str]:
    """Every file under local ``d`` as sorted relative POSIX paths (the manifest excluded)."""
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST
    )
