"""What ``crucible resume`` may change in a run's spec, whether there is anything left to
resume, and the history of the spec changes it made.

A resumed run continues from a checkpoint whose weights, optimizer state and data position
were made under the run's resolved spec. Only keys that do not change what those mean may be
changed on resume (:data:`SAFE_ON_RESUME`); the rest (the model, the data and its order, the
optimizer, the seeds, the global batch, the run's name and storage) are refused before
anything is written or submitted.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any

from crucible.cluster.storage import JsonlLog, Location
from crucible.config import spec_hash
from crucible.errors import CrucibleError
from crucible.jobs.spec import PPORunSpec, RunSpec, TrainRunSpec

HISTORY = "spec_history.jsonl"

# Dotted key prefixes a resume may change (a prefix ending in "." covers a whole section).
# Placement, resources, world size (the checkpoint is converted), monitoring, retention and
# the budget: none of them changes the meaning of the saved state. A longer budget recomputes
# the LR schedule over the new total (a cosine schedule then rises again; WSD and constant are
# the ones meant to be extended).
SAFE_ON_RESUME: tuple[str, ...] = (
    "cluster.",
    "train.num_workers",
    "train.use_gpu",
    "train.cpus_per_worker",
    "train.placement_strategy",
    "train.max_steps",
    "train.max_tokens",
    "train.eval_every",
    "train.eval_batches",
    "train.eval_prompts",
    "train.eval_max_new_tokens",
    "train.max_failures",
    "train.log_every",
    "train.hang_timeout_s",
    "train.preemption_checkpoint",
    "train.preemption_grace_s",
    "train.straggler_check_every",
    "train.straggler_factor",
    "train.straggler_checks",
    "train.gpu_hour_budget",
    "train.max_rollbacks",
    "train.rollback_window_steps",
    "train.rollback_skip_batches",
    "train.spike_window",
    "train.spike_zscore",
    "train.spike_ratio",
    "monitoring.",
    "checkpoint.",
    "data.verify",
    "data.allow_manifest_change",
    "data.skip_batches",  # skipping more batches by hand, as a rollback does, is safe
    "model.parallel.activation_checkpointing",
    "model.parallel.compile",
    "model.parallel.overlap_comm",
    "model.parallel.contiguous_gradients",
    "model.parallel.prefetch_bucket_size",
    "model.parallel.reduce_bucket_size",
    "model.parallel.max_live_parameters",
    # a PPO run: its workers, and more steps (the prompt order is a function of the step and
    # there is no learning-rate schedule)
    "workers.num_workers",
    "workers.use_gpu",
    "workers.cpus_per_worker",
    "workers.max_failures",
    "ppo.steps",
    "frozen.",  # where the reference and reward models run: the same numbers either way
)
# Exceptions inside the safe prefixes: the storage is where the run directory is.
UNSAFE_ON_RESUME: tuple[str, ...] = ("cluster.storage",)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): data}


def spec_changes(old: RunSpec, new: RunSpec) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between ``old`` and ``new``: ``{key: (old, new)}``
    in the spec's order (a key only one side has is ``None`` on the other)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    keys = list(a) + [k for k in b if k not in a]
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def safe_on_resume(key: str) -> bool:
    """Whether dotted spec key ``key`` may change when a run is resumed."""

    def matches(prefix: str) -> bool:
        if prefix.endswith("."):
            return key.startswith(prefix)
        return key == prefix or key.startswith(prefix + ".")

    return any(map(matches, SAFE_ON_RESUME)) and not any(map(matches, UNSAFE_ON_RESUME))


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_resume_changes(old: RunSpec, new: RunSpec) -> dict[str, tuple[Any, Any]]:
    """The changes resuming ``old`` as ``new`` makes, if all are safe.

    Raises:
        CrucibleError: one line naming the first key that may not change.
    """
    changes = spec_changes(old, new)
    for key, (was, now) in changes.items():
        if not safe_on_resume(key):
            raise CrucibleError(
                f"resume cannot change {key} ({_show(was)} → {_show(now)}); start a new run "
                "with another name"
            )
    return changes


def record_spec_changes(run: Location, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append ``{time, changes: {key: [old, new]}}`` to ``<run>/spec_history.jsonl``
    (nothing when there are no changes).

    Args:
        run: the run directory.
        changes: from :func:`check_resume_changes`.
    """
    if not changes:
        return
    log = JsonlLog(run / HISTORY)
    log.append({"time": time.time(), "changes": {k: list(v) for k, v in changes.items()}}, True)
    log.close()


def record_if_applied(run: Location, spec: RunSpec, changes: dict[str, tuple[Any, Any]]) -> None:
    """Record ``changes`` if the resolved spec in ``run`` is now ``spec`` (the submission got
    as far as writing it, even if it failed after)."""
    from crucible.jobs.runs import load_run_spec

    with contextlib.suppress(CrucibleError):
        if spec_hash(load_run_spec(run)) == spec_hash(spec):
            record_spec_changes(run, changes)


def planned_steps(spec: TrainRunSpec, checkpoint_state: dict[str, Any] | None = None) -> int:
    """Optimizer steps the whole run takes under ``spec``.

    Args:
        spec: the train spec.
        checkpoint_state: a checkpoint's crucible state; its ``total_steps`` is used when the
            budget in ``spec`` is the checkpoint's own.
    """
    state = checkpoint_state or {}
    saved = (state.get("spec") or {}).get("train", {})
    budget = (spec.train.max_steps, spec.train.max_tokens)
    if "total_steps" in state and (saved.get("max_steps"), saved.get("max_tokens")) == budget:
        return int(state["total_steps"])
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    from crucible.data_pipeline.shards.manifest import read_manifest

    seq = spec.model.resolve().max_seq_len
    with contextlib.suppress(CrucibleError, OSError):
        seq = read_manifest(spec.data.shards).seq_len
    assert spec.train.max_tokens is not None  # the spec requires one of them
    return math.ceil(spec.train.max_tokens / (spec.optim.global_batch_size * seq))


def finished_step(run: Location, spec: TrainRunSpec | PPORunSpec) -> int | None:
    """The step of the newest committed checkpoint of ``run`` if it is the last step of the
    run under ``spec`` (nothing is left to train), else None.

    Args:
        run: the run directory.
        spec: the spec it would be resumed with.
    """
    from crucible.jobs.train import checkpoint as ckpt

    root = run / "checkpoints"
    if not root.is_dir():
        return None
    newest = ckpt.latest_committed(root)
    if newest is None:
        return None
    try:
        state = ckpt.read_state(newest[0])
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    last = spec.ppo.steps if isinstance(spec, PPORunSpec) else planned_steps(spec, state)
    return step if step >= last else None
