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

    Every rank writes its RNG state. The engine's files depend on the ZeRO stage, read from
    the files themselves: under ZeRO-3 each rank writes its model-state shard
    (``zero_pp_rank_<r>_mp_rank_00_model_states.pt``); under stages 0-2 rank 0 alone writes
    ``mp_rank_00_model_states.pt``. Each rank writes its ZeRO optimizer shard
    (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``) except under plain fp32
    stage 0, where the optimizer is inside the model states.

    Args:
        files: relative paths present (or listed in the manifest).
        world_size: data-parallel ranks that wrote the checkpoint.
    """
    names = set(files)

    def has(pattern: str) -> bool:
        return any(re.match(pattern, f) for f in names)

    missing = [
        f"crucible_state/rank-{r}.pt"
        for r in range(world_size)
        if not has(rf"^crucible_state/rank-{r}\.pt$")
    ]
    # every engine's directory: the model's (DS_TAG) and any other a job saves beside it
    # (a PPO run's value model)
    tags = {DS_TAG} | {f.split("/", 1)[0] for f in names if f.endswith("model_states.pt")}
    for tag in sorted(tags):
        zero3 = has(rf"^{tag}/zero_pp_rank_\d+_mp_rank_00_model_states\.pt$")
        sharded_optim = zero3 or has(rf"^{tag}/(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states")
        if not zero3 and not has(rf"^{tag}/mp_rank_00_model_states\.pt$"):
            missing.append(f"{tag}/mp_rank_00_model_states.pt")
        for r in range(world_size):
            wanted = {}
            if sharded_optim:
                wanted[f"{tag}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = (
                    rf"^{tag}/(bf16_)?zero_pp_rank_{r}_mp_rank_00_optim_states\.pt$"
                )
            if zero3:
                wanted[f"{tag}/zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = (
                    rf"^{tag}/zero_pp_rank_{r}_mp_rank_00_model_states\.pt$"
                )
            missing += [name for name, pattern in wanted.items() if not has(pattern)]
    return missing


def shared_files(files: Iterable[str]) -> list[str]:
    """Engine files every rank loads although one rank wrote them (ZeRO stages 0-2's
    ``mp_rank_00_model_states.pt``, of every engine): fetched by every rank from an object
    store.

    Args:
        files: relative paths (a manifest's ``files`` mapping works too).
    """
    return sorted(f for f in files if re.match(r"^[^/]+/mp_rank_\d+_model_states\.pt$", f))


def list_files(d: Path) -> list[str]:
    """Every file under local ``d`` as sorted relative POSIX paths (the manifest excluded)."""
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST
    )
