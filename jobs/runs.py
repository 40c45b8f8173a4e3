"""Run directories: ``<storage>/<name>/`` holds the resolved spec and everything a run writes.

A run directory is a :class:`~crucible.cluster.storage.Location`: a path every node shares or
an object-store URI. A run has a stable name. Submitting a spec under a name whose directory
already holds a different spec is refused (instead of silently continuing an old run); the
same spec again resumes it, which for a data job finishes what is missing or does nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from crucible.cluster.storage import Location, check_storage, location
from crucible.config import spec_hash
from crucible.errors import CrucibleError
from crucible.jobs.spec import (
    TRAINING_KINDS,
    LanguageModelRunSpec,
    PPORunSpec,
    RunSpec,
    TrainRunSpec,
    parse_spec,
    write_resolved,
)

RESOLVED = "spec.resolved.yaml"


def absolutize(spec: RunSpec, base: Path | None = None) -> RunSpec:
    """Make the spec's local paths absolute (relative to ``base``, default the CWD); URIs are
    kept as they are.

    The job runs in another working directory (and on a cluster, on another machine with the
    same shared paths), so the resolved spec must not depend on where it was submitted from.
    """
    base = (base or Path.cwd()).resolve()
    data = spec.model_dump(mode="json")

    def fix(p: str) -> str:
        if "://" in p or Path(p).is_absolute():
            return p
        return str(base / p)

    data["cluster"]["storage"] = fix(data["cluster"]["storage"])
    if spec.kind in ("rejection-sampling", "ppo"):
        data["policy"], data["reward"] = fix(data["policy"]), fix(data["reward"])
        data["prompts"] = [fix(p) for p in data["prompts"]]
        if spec.kind == "ppo":
            data["data"]["shards"] = fix(data["data"]["shards"])
    elif spec.kind in TRAINING_KINDS:
        data["data"]["shards"] = fix(data["data"]["shards"])
        if data["train"].get("eval_prompts"):
            data["train"]["eval_prompts"] = fix(data["train"]["eval_prompts"])
        source = data.get("base") or {}
        for key in ("checkpoint", "hf"):
            if source.get(key):
                source[key] = fix(source[key])
    else:
        data["data"]["inputs"] = [fix(p) for p in data["data"]["inputs"]]
        shards = data["data"].get("shards") or {}
        tok = shards.get("tokenizer") or {}
        if tok.get("path"):
            tok["path"] = fix(tok["path"])
    return parse_spec(data, source="spec")


def run_location(spec: RunSpec) -> Location:
    """``<storage>/<name>``."""
    return location(spec.cluster.storage) / spec.name


def prepare_run(spec: RunSpec, resume: bool = False) -> Location:
    """Check the storage, create (or reopen) the run directory of ``spec`` and write the
    resolved spec into it.

    Raises:
        CrucibleError: the storage cannot be used (unreachable, missing bucket, read-only,
            no credentials), or the name is taken by a run of a different spec.
    """
    check_storage(spec.cluster.storage)
    run = run_location(spec)
    existing = run / RESOLVED
    if existing.is_file() and not resume and started_work(run):
        old = load_run_spec(run)
        if spec_hash(old) != spec_hash(spec):
            again = (
                f"`crucible resume {spec.name}`"
                if old.kind != "data"
                else f"rerun it with its own spec (`crucible data run {existing}`)"
            )
            raise CrucibleError(
                f"run {spec.name!r} already exists in {run} with a different spec; pick "
                f"another name, or {again} to finish it as it was"
            )
    write_resolved(spec, run)
    return run


# What a run directory holds before its job did any work: the spec and the submissions.
_BEFORE_WORK = {RESOLVED, "jobs.jsonl"}


def started_work(run: Location) -> bool:
    """Whether run ``run`` holds anything but its spec and its job history: a run whose
    attempts all failed before doing any work can take a corrected spec under its name."""
    return any(name not in _BEFORE_WORK for name in run.ls())


def find_run(run: str, storage: str | None = None) -> Location:
    """A run directory from its path or URI, or from a run name under ``storage`` (default
    ``runs``).

    Raises:
        CrucibleError: no run there; the message lists the runs under ``storage``.
    """
    root = storage or "runs"
    candidates = [location(run)] if ("://" in run or "/" in run) else []
    candidates.append(location(root) / run)
    for c in candidates:
        if (c / RESOLVED).is_file():
            return c
    base = location(root)
    names = [n for n in base.ls() if (base / n / RESOLVED).is_file()] if base.is_dir() else []
    listed = ", ".join(names[:10]) or "none"
    raise CrucibleError(
        f"no run {run!r} (looked for {' and '.join(str(c / RESOLVED) for c in candidates)}); "
        f"runs under {base}: {listed}"
    )


def load_train_spec(run: Location) -> TrainRunSpec:
    """The resolved spec of train run ``run`` (an error if the run is not a train run)."""
    spec = load_run_spec(run)
    if not isinstance(spec, TrainRunSpec):
        raise CrucibleError(f"{run} is a {spec.kind} run, not a train run")
    return spec


def load_model_spec(run: Location) -> LanguageModelRunSpec:
    """The resolved spec of ``run``, a run whose checkpoints hold a language model (train,
    finetune or ppo; an error otherwise)."""
    spec = load_run_spec(run)
    if not isinstance(spec, TrainRunSpec | PPORunSpec):
        raise CrucibleError(f"{run} is a {spec.kind} run, not one that trains a language model")
    return spec


def load_run_spec(run: Location | str | Path) -> RunSpec:
    """The resolved spec saved in run directory ``run``."""
    path = location(run) / RESOLVED
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CrucibleError(f"{path} does not exist; {run} is not a run directory") from None
    return parse_spec(yaml.safe_load(text), source=str(path))


def stop_request(run: Location) -> Location:
    """Where a graceful stop of run ``run`` is asked for (``crucible jobs stop`` writes it,
    the training ranks look for it; see :mod:`crucible.jobs.train.callbacks.stopper`)."""
    return run / "control" / "stop.json"
